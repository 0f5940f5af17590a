"""Distillation losses: self-attention relation KL (MiniLM v1/v2) and hidden-state MSE (TinyBERT).

`relation_kl` is public API (DESIGN.md, "Contracts"): researchers call it in their own loops.
The math is docs/methods.md section 2; the fast implementation lives in `lmdistill._relation_kernel`
and is checked against an independent plain-autograd reference in `tests/test_losses.py`.

Numerics: everything is computed in float32, also under bf16/fp16 autocast (inputs are cast up
and autocast is disabled inside: on CPU an autocast matmul returns bf16 even from float32
inputs). No epsilon, no dropout; log-probabilities come from log-softmax.

Gradients flow only into the student tensors. The teacher tensors are constants: they may be
inference tensors (from `torch.inference_mode()`), and if they require grad they still get none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lmdistill._relation_kernel import RelationKLFunction, RelationPlan
from lmdistill.errors import UserError

__all__ = ["LossInputError", "RelationPlan", "hidden_mse", "relation_kl", "relation_scores"]

REDUCTIONS = ("rows", "per_sequence")


class LossInputError(UserError, ValueError):
    """Inputs of a loss with impossible shapes or options (a `ValueError` and a `UserError`)."""


def _divisors_hint(*sizes: int) -> str:
    g = math.gcd(*sizes)
    common = [k for k in range(1, g + 1) if g % k == 0]
    usual = [k for k in common if 8 <= k <= 64]  # the head counts of the papers (12 to 64)
    return ", ".join(str(k) for k in usual or common[-6:])


def _check_heads(num_heads: int, **sizes: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise LossInputError(f"num_heads must be a positive int, got R={num_heads!r}")
    bad = {k: v for k, v in sizes.items() if v % num_heads}
    if bad:
        named = ", ".join(f"{k} d={v}" for k, v in sizes.items())
        raise LossInputError(
            f"relation heads R={num_heads} must divide every hidden size ({named}); "
            f"set the relation head count to a common divisor, e.g. one of "
            f"{_divisors_hint(*sizes.values())}"
        )


def _check_pair(name: str, pair) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pair, Sequence) or len(pair) != 2:
        raise LossInputError(f"{name} must be a (left, right) pair of [B, L, d] tensors")
    left, right = pair
    if left.dim() != 3 or left.shape != right.shape:
        raise LossInputError(
            f"{name} left and right must be [B, L, d] tensors of one shape, got "
            f"{tuple(left.shape)} and {tuple(right.shape)}; pass projections of one layer"
        )
    return left, right


def _check_mask(attention_mask: torch.Tensor, batch: int, length: int) -> None:
    if attention_mask.shape != (batch, length):
        raise LossInputError(
            f"attention_mask must be [B, L] = [{batch}, {length}] to match the projections, got "
            f"{tuple(attention_mask.shape)}; pass the batch's attention_mask"
        )


def _key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, 1, 1, L] float32 additive mask: 0 on real keys, finfo.min on pad keys."""
    pad = attention_mask.to(torch.float32) == 0
    bias = torch.zeros(pad.shape, dtype=torch.float32, device=attention_mask.device)
    return bias.masked_fill_(pad, torch.finfo(torch.float32).min)[:, None, None, :]


def relation_scores(
    left: torch.Tensor, right: torch.Tensor, attention_mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Masked relation scores, [B, R, L, L] float32: left_h right_h^T / sqrt(r) + key_mask.

    The plain formula of docs/methods.md section 2 (all of it materialised; for analysis and checks).
    left, right: [B, L, d]; attention_mask: [B, L] (1 real, 0 pad); num_heads R divides d.
    """
    left, right = _check_pair("left/right", (left, right))
    b, length, d = left.shape
    _check_heads(num_heads, hidden=d)
    _check_mask(attention_mask, b, length)
    r = d // num_heads
    with torch.autocast(device_type=left.device.type, enabled=False):
        lh = left.float().view(b, length, num_heads, r).transpose(1, 2)
        rh = right.float().view(b, length, num_heads, r).transpose(1, 2)
        return lh @ rh.transpose(-1, -2) / math.sqrt(r) + _key_mask(attention_mask)


def relation_kl(
    teacher: tuple[torch.Tensor, torch.Tensor],
    student: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    num_heads: int,
    reduction: str = "rows",
    plan: RelationPlan | None = None,
) -> torch.Tensor:
    """KL(teacher relation || student relation) over R relation heads; a float32 scalar.

    teacher, student: (left, right) pairs of [B, L, d] tensors (d may differ between teacher and
    student); (Q, Q) gives the QQ self-attention relation, (Q, K) the attention distribution.
    `left` and `right` may be the same tensor object. attention_mask: [B, L] (1 real token, 0 pad).
    num_heads: R relation heads; must divide both hidden sizes (else `LossInputError`, a
    `ValueError`). reduction: "rows" (mean over all valid rows (b, h, i) of the batch:
    token-weighted) or "per_sequence" (mean per sequence over its valid rows, then mean over the
    sequences; sequences without any real token are left out of both).

    For each side, with r = d / R and X_h the plain reshape x.view(B, L, R, r).transpose(1, 2):
    S = left_h right_h^T / sqrt(r) + key_mask, P_T = softmax(S_T), log Q_S = log_softmax(S_S),
    KL_row = sum_j P_T (log P_T - log Q_S); rows of pad query tokens are excluded.

    Gradients flow into the student tensors only; the teacher tensors are treated as constants
    (inference tensors are fine; teacher tensors that require grad get no gradient). Computed in
    float32 even under autocast. Pad positions never change the result and get zero gradient.
    A batch without any real token gives 0.

    On a CPU the batch is computed sequence group by sequence group, sliced to the real lengths,
    which are read from `plan` (`RelationPlan.of(mask)` on the host batch) or else from the mask.
    On a GPU it is computed masked at the padded length and `plan` is not needed: nothing is
    read on the host, so the device never waits.
    """
    if reduction not in REDUCTIONS:
        raise LossInputError(
            f"unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}"
        )
    t_left, t_right = _check_pair("teacher", teacher)
    s_left, s_right = _check_pair("student", student)
    if t_left.shape[:2] != s_left.shape[:2]:
        raise LossInputError(
            f"teacher and student projections must share [B, L], got {tuple(t_left.shape)} and "
            f"{tuple(s_left.shape)}; feed both models the same batch"
        )
    b, length, d_s = s_left.shape
    _check_heads(num_heads, teacher=t_left.shape[2], student=d_s)
    _check_mask(attention_mask, b, length)

    t_shared = t_left is t_right
    s_shared = s_left is s_right
    with torch.autocast(device_type=s_left.device.type, enabled=False):
        t_left = t_left.detach().float()
        t_right = t_left if t_shared else t_right.detach().float()
        s_left = s_left.float()
        s_right = s_left if s_shared else s_right.float()
        return RelationKLFunction.apply(
            s_left, s_right, t_left, t_right, attention_mask, num_heads, reduction, s_shared, plan
        )


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over real tokens and hidden dims (TinyBERT), a float32 scalar.

    student, teacher: [B, L, d] (project the student to the teacher's width first);
    attention_mask: [B, L]. The teacher is a constant (no gradient). Computed in float32.
    """
    if student.dim() != 3 or student.shape != teacher.shape:
        raise LossInputError(
            f"hidden_mse needs student and teacher [B, L, d] of one shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}; project the student first"
        )
    _check_mask(attention_mask, student.shape[0], student.shape[1])
    with torch.autocast(device_type=student.device.type, enabled=False):
        valid = (attention_mask != 0).to(torch.float32).unsqueeze(-1)
        err = (student.float() - teacher.detach().float()).square() * valid
        denom = valid.sum() * student.shape[-1]
        return err.sum() / denom.clamp_min(1.0)
