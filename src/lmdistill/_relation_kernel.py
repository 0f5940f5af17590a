"""Fast path of `lmdistill.losses.relation_kl`: fused, padding-free, chunked relation KL.

Private module; the public API is in `lmdistill.losses`. Why it looks like this (measured on the
2-core AVX-512 development machine, B=32, L=128, R=32, d=384, see `benchmarks/relation_loss.py`):

* **Closed-form gradient, computed eagerly.** d KL_row / d S_student = softmax(S_S) - P_T, so the
  gradients with respect to the student's left/right projections are two small matmuls per chunk
  (G @ right, G^T @ left). They are computed in the forward pass while the chunk's [c, n, n]
  tensors are still in cache, and only the [B, L, d] gradients are kept for backward. Nothing of
  size L x L outlives a chunk (naive autograd keeps several [B, R, L, L] float32 tensors, 67 MB
  each at the benchmark setting). When no gradient is needed (eval, `no_grad`) G is skipped.
* **No padding is computed.** Each sequence is sliced to its last valid token. Sequences with a
  contiguous mask (all real tokens first, the usual case) need no key mask at all inside their
  slice; other sequences get the key mask (finfo(float32).min) and a query-row mask inside the
  slice. Sequences of equal valid length are processed together, in chunks of
  (sequence, head) pairs of about `CHUNK_ELEMENTS` scores, which keeps each chunk cache-sized.
* One fused order of operations per chunk: 2 bmm, 2 log_softmax, 1 subtraction, 1 exp, 1 dot
  (the KL sum), then softmax(S_S) - P_T and 2 bmm for the gradients.

The loss is a weighted sum of per-row KLs, sum_rows w_row * KL_row, with w_row = 1 / (number of
valid rows) for reduction "rows" and 1 / (R * count_b * number of non-empty sequences) for
"per_sequence"; pad rows have weight 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Scores per chunk (c * n * n). On a CPU about 0.5M float32 = 2 MB per [c, n, n] tensor: one
# full-length sequence of 32 heads at L=128, or two at L=64; measured best on the development
# machine (benchmarks/relation_loss.py --sweep-chunk). On a GPU, large chunks keep the kernel
# count low: 64M scores (256 MB per tensor) is a batch of 128 x 48 heads x 128 x 128 in 2 chunks.
CHUNK_ELEMENTS = 1 << 19
CHUNK_ELEMENTS_GPU = 1 << 26

# How sequences are batched: "auto" ("masked" on GPUs and other accelerators, "group" on CPUs),
# "group" (sequences of equal valid length together, sliced to that length: no padding computed;
# needs the lengths on the host, from a `RelationPlan` made before the batch reached the device),
# "per_sequence" (a Python loop over sequences) or "masked" (the whole batch at its padded length
# with key and row masks, weights computed on the device: no host read at all). Only the
# benchmark and tests change it, to compare them.
STRATEGY = "auto"


class RelationPlan(NamedTuple):
    """Valid lengths of a batch, read on the host once (before the batch is sent to a device).

    counts[b]: real tokens of sequence b; ends[b]: 1 + position of its last real token (equal to
    counts[b] when the real tokens come first, the usual case).
    """

    counts: tuple[int, ...]
    ends: tuple[int, ...]

    @classmethod
    def of(cls, mask: torch.Tensor) -> RelationPlan:
        """From a [B, L] mask (a host read: give it the mask of the batch on the host)."""
        valid = mask != 0
        idx = torch.arange(valid.shape[1], device=valid.device)
        ends = torch.where(valid, idx + 1, 0).amax(1)
        counts, ends = torch.stack([valid.sum(1), ends]).tolist()
        return cls(tuple(counts), tuple(ends))


def strategy_for(device: torch.device) -> str:
    """The batching strategy used on `device` (see STRATEGY)."""
    if STRATEGY != "auto":
        return STRATEGY
    return "group" if device.type == "cpu" else "masked"


def _heads(x: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """[B, L, d] -> contiguous [B, R, L, r], optionally multiplied by `scale` (one pass)."""
    b, length, d = x.shape
    y = x.view(b, length, num_heads, d // num_heads).transpose(1, 2)
    return (y * scale).contiguous() if scale is not None else y.contiguous()


def _plan(mask: torch.Tensor, reduction: str, num_heads: int, plan: RelationPlan | None,
          strategy: str):  # fmt: skip
    """Group the batch by valid length.

    Returns (groups, odd, weights): `groups` maps a length n to the indices of the sequences whose
    real tokens are exactly positions 0..n-1; `odd` lists (index, n, valid[:n]) for sequences with
    a non-contiguous mask; `weights[b]` is the weight of each valid row of sequence b.
    """
    valid = mask != 0
    counts, ends = plan if plan is not None else RelationPlan.of(mask)
    nonempty = sum(1 for c in counts if c > 0)
    total = sum(counts)
    groups: dict = {}
    odd: list[tuple[int, int, torch.Tensor]] = []
    weights: list[float] = []
    for b, (count, n) in enumerate(zip(counts, ends, strict=True)):
        if count == 0:
            weights.append(0.0)
            continue
        if reduction == "rows":
            weights.append(1.0 / (num_heads * total))
        else:
            weights.append(1.0 / (num_heads * count * nonempty))
        if count == n:
            groups.setdefault(n if strategy == "group" else (n, b), []).append(b)
        else:
            odd.append((b, n, valid[b, :n]))
    return groups, odd, weights


def _chunk(ls, rs, lt, rt, weight_rows, key_bias, need_grad):
    """One chunk of c (sequence, head) pairs at length n.

    ls/lt: [c, n, r] left projections already multiplied by 1/sqrt(r); rs/rt: [c, n, r] right.
    weight_rows: [c, n, 1] per-row weights (0 on pad query rows), or a float when uniform.
    key_bias: [c or 1, 1, n] (0 / finfo.min), or None when every key in the slice is real.
    Returns (weighted KL sum, G @ rs, G^T @ ls) with G = (softmax(S_S) - P_T) * weight_rows when
    the weights are a tensor (the caller applies a uniform float weight and the 1/sqrt(r) of the
    left gradient to the small results), or (kl, None, None) when no gradient is needed.
    """
    if key_bias is None:
        s_t = torch.bmm(lt, rt.transpose(1, 2))
        s_s = torch.bmm(ls, rs.transpose(1, 2))
    else:
        s_t = torch.baddbmm(key_bias, lt, rt.transpose(1, 2))
        s_s = torch.baddbmm(key_bias, ls, rs.transpose(1, 2))
    log_p = torch.log_softmax(s_t, -1)
    del s_t
    log_q = torch.log_softmax(s_s, -1)
    diff = torch.sub(log_p, log_q, out=log_q)  # log P_T - log Q_S, reusing log_q's memory
    p = log_p.exp_()
    if isinstance(weight_rows, float):
        kl = torch.dot(p.view(-1), diff.view(-1)) * weight_rows
    else:
        kl = torch.dot(p.view(-1), diff.mul_(weight_rows).view(-1))
    if not need_grad:
        return kl, None, None
    g = torch.softmax(s_s, -1).sub_(p)  # d KL_row / d S_S, before the row weight
    del s_s, p, diff
    if not isinstance(weight_rows, float):
        g.mul_(weight_rows)
    grad_l = torch.bmm(g, rs)  # times 1/sqrt(r) (and the uniform weight) by the caller
    grad_r = torch.bmm(g.transpose(1, 2), ls)  # ls is pre-scaled: already carries 1/sqrt(r)
    return kl, grad_l, grad_r


def _masked(ctx, ls, rs, mask, num_heads, reduction, need_grad, shared, scale_s, run, shape):
    """The whole batch at its padded length with key and row masks; every weight is computed on
    the device, so nothing is read on the host (the GPU path)."""
    b, length, d_s = shape
    valid = mask != 0  # [B, L]
    counts = valid.sum(1).to(torch.float32)  # [B]
    if reduction == "rows":
        per_row = (num_heads * counts.sum()).clamp_min(1.0).reciprocal().expand(b)
    else:
        sequences = (counts > 0).sum().clamp_min(1)
        per_row = (num_heads * counts.clamp_min(1.0) * sequences).reciprocal()  # [B]
    w = valid.to(torch.float32) * per_row[:, None]  # [B, L]
    rows = w[:, None, :, None].expand(b, num_heads, length, 1).reshape(-1, length, 1)
    bias = torch.zeros(b, length, dtype=torch.float32, device=mask.device)
    bias.masked_fill_(~valid, torch.finfo(torch.float32).min)
    bias = bias[:, None, None, :].expand(b, num_heads, 1, length).reshape(-1, 1, length)
    total, gls, grs = run(slice(None), length, rows, bias)
    if need_grad:
        g_l = torch.cat(gls).view(b, num_heads, length, -1).mul_(scale_s)
        g_r = torch.cat(grs).view(b, num_heads, length, -1)
        if shared:
            g_l += g_r
        grad_left = g_l.transpose(1, 2).reshape(b, length, d_s)
        grad_right = None if shared else g_r.transpose(1, 2).reshape(b, length, d_s)
        ctx.save_for_backward(grad_left, grad_right)
    ctx.shared = shared
    return total


class RelationKLFunction(torch.autograd.Function):
    """sum_rows w_row KL(P_T row || Q_S row); differentiable in the student tensors only.

    Inputs must be float32 [B, L, d] tensors, validated by the caller. The teacher tensors are
    treated as constants: they are never saved and receive no gradient (None), so they may be
    inference tensors.
    """

    @staticmethod
    def forward(ctx, s_left, s_right, t_left, t_right, mask, num_heads, reduction, shared, plan):
        b, length, d_s = s_left.shape
        d_t = t_left.shape[2]
        scale_s = 1.0 / math.sqrt(d_s // num_heads)
        scale_t = 1.0 / math.sqrt(d_t // num_heads)
        need_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])

        strategy = strategy_for(s_left.device)
        # Left sides are pre-multiplied by 1/sqrt(r) (one pass over a small tensor instead of one
        # over the scores); right sides stay raw. In the shared (Q, Q) case the right side is the
        # raw heads of the same tensor and both gradients accumulate into one buffer.
        ls = _heads(s_left, num_heads, scale_s)  # [B, R, L, r_s]
        rs = _heads(s_right, num_heads)
        lt = _heads(t_left, num_heads, scale_t)
        rt = _heads(t_right, num_heads)
        r_s = ls.shape[-1]

        total = torch.zeros((), dtype=torch.float32, device=s_left.device)
        if need_grad:
            g_ls = torch.zeros_like(ls)  # gradients wrt the [B, R, L, r] views of the raw inputs
            g_rs = g_ls if shared else torch.zeros_like(rs)

        chunk_elements = CHUNK_ELEMENTS if s_left.device.type == "cpu" else CHUNK_ELEMENTS_GPU

        def run(sel, n, weight_rows, key_bias):
            c_ls = ls[sel, :, :n].reshape(-1, n, r_s)
            c_rs = rs[sel, :, :n].reshape(-1, n, r_s)
            c_lt = lt[sel, :, :n].reshape(-1, n, lt.shape[-1])
            c_rt = rt[sel, :, :n].reshape(-1, n, rt.shape[-1])
            per = max(1, chunk_elements // (n * n))
            kb_all = key_bias
            kls, gls, grs = [], [], []
            for start in range(0, c_ls.shape[0], per):
                stop = start + per
                wr = weight_rows if isinstance(weight_rows, float) else weight_rows[start:stop]
                kb = kb_all if kb_all is None or kb_all.shape[0] == 1 else kb_all[start:stop]
                kl, gl, gr = _chunk(
                    c_ls[start:stop],
                    c_rs[start:stop],
                    c_lt[start:stop],
                    c_rt[start:stop],
                    wr,
                    kb,
                    need_grad,
                )
                kls.append(kl)
                if need_grad:
                    gls.append(gl)
                    grs.append(gr)
            return torch.stack(kls).sum(), gls, grs

        if strategy == "masked":
            return _masked(ctx, ls, rs, mask, num_heads, reduction, need_grad, shared, scale_s,
                           run, s_left.shape)  # fmt: skip

        groups, odd, weights = _plan(mask, reduction, num_heads, plan, strategy)
        for key, members in sorted(groups.items()):
            n = key if isinstance(key, int) else key[0]
            w = weights[members[0]]  # equal within a group: same count, same reduction weight
            if members == list(range(members[0], members[-1] + 1)):
                sel = slice(members[0], members[-1] + 1)
            else:
                sel = torch.tensor(members, device=s_left.device)
            kl, gls, grs = run(sel, n, w, None)
            total = total + kl
            if need_grad:
                g_ls[sel, :, :n] += torch.cat(gls).view(-1, num_heads, n, r_s).mul_(scale_s * w)
                g_rs[sel, :, :n] += torch.cat(grs).view(-1, num_heads, n, r_s).mul_(w)

        finfo_min = torch.finfo(torch.float32).min
        for bi, n, valid in odd:
            w = weights[bi]
            key_bias = torch.zeros(n, dtype=torch.float32, device=s_left.device)
            key_bias.masked_fill_(~valid, finfo_min)
            rows = valid.to(torch.float32).mul(w).view(1, n, 1).expand(num_heads, n, 1)
            kl, gls, grs = run(slice(bi, bi + 1), n, rows, key_bias.view(1, 1, n))
            total = total + kl
            if need_grad:
                g_ls[bi, :, :n] += torch.cat(gls).mul_(scale_s)
                g_rs[bi, :, :n] += torch.cat(grs)

        if need_grad:
            # back to [B, L, d] layout of the raw inputs
            grad_left = g_ls.transpose(1, 2).reshape(b, length, d_s)
            grad_right = None if shared else g_rs.transpose(1, 2).reshape(b, length, d_s)
            ctx.save_for_backward(grad_left, grad_right)
        ctx.shared = shared
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_left, grad_right = ctx.saved_tensors
        g_l = grad_left * grad_out if ctx.needs_input_grad[0] else None
        g_r = None
        if grad_right is not None and ctx.needs_input_grad[1]:
            g_r = grad_right * grad_out
        return g_l, g_r, None, None, None, None, None, None, None
