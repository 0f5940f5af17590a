"""Sparse MiniLM (docs/methods.md section 6): MiniLM v2 relations from the unpruned teacher into the
teacher sliced at a target sparsity.

The student's relation site defaults to the top projection of the original code: Q, K, V of
the teacher's width d_T from the student's final hidden states (`Linear(d', 3 d_T)`, not
exported), so the relation heads R need only divide d_T (the sliced hidden size d', e.g. 248
for BERT-base at s90, rarely divides by 32). `last_layer` reads the last layer's own Q/K/V
(h a wide: R must divide it, and the layer must have heads left).
"""

from __future__ import annotations

import torch
from torch import nn

from lmdistill.errors import UserError
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.relations import (
    QKVRelationSteps,
    check_reduction,
    check_relation_site,
    check_relation_weights,
    relation_settings,
    self_relation_terms,
    weighted_relation,
)
from lmdistill.models.capture import QKV, encoder_layers
from lmdistill.models.sparse import SparseBertConfig, sparse_gflops, sparse_params


class SparseMiniLM(QKVRelationSteps, DistillationMethod):
    """L = (w_qq KL_QQ + w_kk KL_KK + w_vv KL_VV) / (w_qq + w_kk + w_vv), teacher layer
    `teacher.layer`, student site `relation_site` (null: top_projection)."""

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
        if not isinstance(student.config, SparseBertConfig):
            raise UserError(
                "method=sparse_minilm distils a sliced sparse student; keep the student builder "
                "of conf/method/sparse_minilm.yaml (student._target_)"
            )
        site = check_relation_site(relation_site, "top_projection")
        width = teacher.hidden_size  # of the top projection's Q, K, V
        if site == "last_layer":
            last = encoder_layers(student)[-1]
            if last.attention is None:
                raise UserError(
                    f"the last layer of the s{student.config.sparsity:g} student has no attention "
                    "heads left; use student.relation_site=top_projection"
                )
            width = last.attention.self.query.out_features
        if relation_heads < 1 or teacher.hidden_size % relation_heads or width % relation_heads:
            raise UserError(
                f"method.relation_heads={relation_heads} must divide the teacher's hidden size "
                f"{teacher.hidden_size} and the student's relation width {width}; choose a divisor"
            )
        super().__init__(teacher, student, optim)
        self.relation_heads = int(relation_heads)
        self.relation_weights = check_relation_weights(relation_weights)
        self.reduction = check_reduction(reduction)
        self.relation_site = site
        d = student.config.hidden_size
        self.relation_projection = nn.Linear(d, 3 * width) if site == "top_projection" else None

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        return self_relation_terms(teacher, student, attention_mask, self.relation_heads,
                                   self.relation_weights, self.reduction, self.batch_plan)  # fmt: skip

    def combine(self, terms: dict) -> torch.Tensor:
        return weighted_relation(terms, self.relation_weights)

    def student_gflops(self, seq_len: int = 128) -> float:
        return sparse_gflops(self.student.config, seq_len)

    def summary_fields(self) -> dict:
        c = self.student.config
        return {
            **super().summary_fields(),
            **relation_settings(self),
            "sparse_student": {
                "sparsity": c.sparsity, "hidden_size": c.hidden_size,
                "layer_heads": list(c.layer_heads), "layer_intermediate": list(c.layer_intermediate),
                "params": sparse_params(c), "gflops": sparse_gflops(c, 128),
            },
        }  # fmt: skip
