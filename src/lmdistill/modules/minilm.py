"""MiniLM v1 (attention distributions + value relation) and v2 (Q-Q, K-K, V-V relations)."""

from __future__ import annotations

import torch

from lmdistill.errors import UserError
from lmdistill.losses import RelationPlan, relation_kl
from lmdistill.models.capture import QKV
from lmdistill.modules.base import DistillationModule

REDUCTIONS = ("rows", "per_sequence")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise UserError(
            f"unknown method.reduction '{reduction}'; use one of {', '.join(REDUCTIONS)}"
        )
    return reduction


def _check_teacher_layer(teacher_layer: int | None, teacher) -> None:
    if teacher_layer is not None and int(teacher_layer) != teacher.layer:
        raise UserError(
            f"method.teacher_layer={teacher_layer} but the teacher was loaded at layer {teacher.layer}; "
            "load the teacher with the method's layer"
        )


def check_relation_heads(relation_heads: int, teacher, student) -> int:
    """R must divide both hidden sizes (METHODS.md section 2)."""
    for who, size in (("teacher", teacher.hidden_size), ("student", student.config.hidden_size)):
        if relation_heads < 1 or size % relation_heads:
            raise UserError(
                f"method.relation_heads={relation_heads} does not divide the {who} hidden size "
                f"{size}; choose relation heads that divide both hidden sizes"
            )
    return int(relation_heads)


def check_relation_weights(relation_weights: dict | None) -> dict:
    """{qq, kk, vv} weights with a positive sum (missing ones default to 1)."""
    weights = {"qq": 1.0, "kk": 1.0, "vv": 1.0, **(relation_weights or {})}
    if set(weights) != {"qq", "kk", "vv"} or sum(weights.values()) <= 0:
        raise UserError(
            f"method.relation_weights={dict(weights)} must give qq, kk, vv with a "
            "positive sum; e.g. {qq: 1, kk: 1, vv: 1}"
        )
    return weights


def self_relation_terms(teacher: QKV, student: QKV, attention_mask, heads: int, weights: dict,
                        reduction: str, plan: RelationPlan | None = None) -> dict:  # fmt: skip
    """MiniLM v2's Q-Q, K-K, V-V relation KLs (terms with weight 0 are skipped)."""
    pairs = {"qq": (teacher.query, student.query), "kk": (teacher.key, student.key),
             "vv": (teacher.value, student.value)}  # fmt: skip
    return {
        name: relation_kl((t, t), (s, s), attention_mask, heads, reduction, plan)
        for name, (t, s) in pairs.items()
        if weights[name]
    }


class MiniLMv2(DistillationModule):
    """Multi-head self-attention relation distillation (METHODS.md section 2).

    L = (w_qq KL_QQ + w_kk KL_KK + w_vv KL_VV) / (w_qq + w_kk + w_vv), each KL over
    `relation_heads` heads of width d/R, teacher and student each with its own width.
    """

    def __init__(
        self,
        teacher,
        student,
        relation_heads: int = 32,
        relation_weights: dict | None = None,
        reduction: str = "rows",
        teacher_layer: int | None = None,
        relation_site: str = "last_layer",
        optim: dict | None = None,
    ):
        relation_heads = check_relation_heads(relation_heads, teacher, student)
        _check_teacher_layer(teacher_layer, teacher)
        super().__init__(teacher, student, relation_site, optim)
        self.relation_heads = relation_heads
        self.relation_weights = check_relation_weights(relation_weights)
        self.reduction = _check_reduction(reduction)

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        return self_relation_terms(teacher, student, attention_mask, self.relation_heads,
                                   self.relation_weights, self.reduction, self._relation_plan)  # fmt: skip

    def combine(self, terms: dict) -> torch.Tensor:
        total = sum(self.relation_weights.values())
        return sum(self.relation_weights[name] * value for name, value in terms.items()) / total


class MiniLMv1(DistillationModule):
    """Attention-distribution and value-relation transfer, per attention head (METHODS.md section 3).

    L = AT + VR; teacher and student must have the same number of attention heads, each model
    scaling by its own head size.
    """

    def __init__(
        self,
        teacher,
        student,
        reduction: str = "rows",
        teacher_layer: int | None = None,
        relation_site: str = "last_layer",
        optim: dict | None = None,
    ):
        if teacher.num_attention_heads != student.config.num_attention_heads:
            raise UserError(
                f"MiniLM v1 needs the same number of attention heads in teacher "
                f"({teacher.num_attention_heads}) and student ({student.config.num_attention_heads}); "
                f"set student.num_attention_heads={teacher.num_attention_heads} or use method=minilm_v2"
            )
        _check_teacher_layer(teacher_layer, teacher)
        super().__init__(teacher, student, relation_site, optim)
        self.heads = teacher.num_attention_heads
        self.reduction = _check_reduction(reduction)

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        return {
            "at": relation_kl(
                (teacher.query, teacher.key),
                (student.query, student.key),
                attention_mask,
                self.heads,
                self.reduction,
                self._relation_plan,
            ),  # fmt: skip
            "vr": relation_kl(
                (teacher.value, teacher.value),
                (student.value, student.value),
                attention_mask,
                self.heads,
                self.reduction,
                self._relation_plan,
            ),  # fmt: skip
        }

    def combine(self, terms: dict) -> torch.Tensor:
        return terms["at"] + terms["vr"]
