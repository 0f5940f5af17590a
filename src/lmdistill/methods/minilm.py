"""MiniLM v1 (attention distributions + value relation) and v2 (Q-Q, K-K, V-V relations)."""

from __future__ import annotations

import torch

from lmdistill.errors import UserError
from lmdistill.losses import relation_kl
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.relations import (
    QKVRelationSteps,
    check_reduction,
    check_relation_heads,
    check_relation_site,
    check_relation_weights,
    relation_settings,
    self_relation_terms,
    top_projection,
    weighted_relation,
)
from lmdistill.models.capture import QKV


class MiniLMv2(QKVRelationSteps, DistillationMethod):
    """Multi-head self-attention relation distillation (docs/methods.md section 2).

    L = (w_qq KL_QQ + w_kk KL_KK + w_vv KL_VV) / (w_qq + w_kk + w_vv), each KL over
    `relation_heads` heads of width d/R, teacher and student each with its own width; the
    teacher's layer is `teacher.layer`, the student's site `relation_site` (null: last_layer).
    """

    def __init__(
        self,
        teacher,
        student,
        relation_heads: int = 32,
        relation_weights: dict | None = None,
        reduction: str = "rows",
        relation_site: str | None = None,
        optim: dict | None = None,
    ):
        relation_heads = check_relation_heads(relation_heads, teacher, student)
        super().__init__(teacher, student, optim)
        self.relation_heads = relation_heads
        self.relation_weights = check_relation_weights(relation_weights)
        self.reduction = check_reduction(reduction)
        self.relation_site = check_relation_site(relation_site, "last_layer")
        top = self.relation_site == "top_projection"
        self.relation_projection = top_projection(student) if top else None

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        return self_relation_terms(teacher, student, attention_mask, self.relation_heads,
                                   self.relation_weights, self.reduction, self.batch_plan)  # fmt: skip

    def combine(self, terms: dict) -> torch.Tensor:
        return weighted_relation(terms, self.relation_weights)

    def summary_fields(self) -> dict:
        return {**super().summary_fields(), **relation_settings(self)}


class MiniLMv1(QKVRelationSteps, DistillationMethod):
    """Attention-distribution and value-relation transfer, per attention head (docs/methods.md
    section 3).

    L = AT + VR; teacher and student must have the same number of attention heads, each model
    scaling by its own head size. The teacher's layer is `teacher.layer` (the paper: the last).
    """

    def __init__(
        self,
        teacher,
        student,
        reduction: str = "rows",
        relation_site: str | None = None,
        optim: dict | None = None,
    ):
        if teacher.num_attention_heads != student.config.num_attention_heads:
            raise UserError(
                f"MiniLM v1 needs the same number of attention heads in teacher "
                f"({teacher.num_attention_heads}) and student ({student.config.num_attention_heads}); "
                f"set student.num_attention_heads={teacher.num_attention_heads} or use method=minilm_v2"
            )
        super().__init__(teacher, student, optim)
        self.heads = teacher.num_attention_heads
        self.reduction = check_reduction(reduction)
        self.relation_site = check_relation_site(relation_site, "last_layer")
        top = self.relation_site == "top_projection"
        self.relation_projection = top_projection(student) if top else None

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        at = relation_kl((teacher.query, teacher.key), (student.query, student.key),
                         attention_mask, self.heads, self.reduction, self.batch_plan)  # fmt: skip
        vr = relation_kl((teacher.value, teacher.value), (student.value, student.value),
                         attention_mask, self.heads, self.reduction, self.batch_plan)  # fmt: skip
        return {"at": at, "vr": vr}

    def combine(self, terms: dict) -> torch.Tensor:
        return terms["at"] + terms["vr"]

    def summary_fields(self) -> dict:
        return {**super().summary_fields(), "attention_heads": self.heads,
                "relation_heads": self.heads, "relation_site": self.relation_site,
                "reduction": self.reduction}  # fmt: skip
