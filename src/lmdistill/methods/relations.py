"""Shared pieces of the relation methods (MiniLM v1, v2, MiniMoE, sparse MiniLM): the student's
relation site, setting checks, the Q-Q, K-K, V-V relation terms, and the steps of a method that
compares teacher and student Q/K/V (docs/methods.md sections 1-3)."""

from __future__ import annotations

from torch import nn

from lmdistill.errors import UserError
from lmdistill.losses import RelationPlan, relation_kl
from lmdistill.models.capture import QKV, forward_qkv
from lmdistill.models.features import FeatureRequest

RELATION_SITES = ("last_layer", "top_projection")
REDUCTIONS = ("rows", "per_sequence")


def check_relation_site(site: str | None, default: str) -> str:
    """`student.relation_site`, or the method's `default` where it is null."""
    site = default if site is None else site
    if site not in RELATION_SITES:
        raise UserError(
            f"unknown student.relation_site '{site}'; use one of {', '.join(RELATION_SITES)}"
        )
    return site


def top_projection(student) -> nn.Linear:
    """The `top_projection` site: Q/K/V `Linear(d, 3d)` on the final hidden states (not exported)."""
    d = student.config.hidden_size
    return nn.Linear(d, 3 * d)


def student_qkv(student, projection: nn.Linear | None, inputs: dict) -> QKV:
    """Q/K/V [B, L, d] of the student at its relation site: the last layer's projections
    (`projection` None; the layers above are never computed) or the top projection."""
    if projection is None:
        return forward_qkv(student, student.config.num_hidden_layers - 1, **inputs)
    hidden = student(**inputs).last_hidden_state  # [B, L, d]
    return QKV(*projection(hidden).chunk(3, dim=-1))


class QKVRelationSteps:
    """Mixin (before `DistillationMethod`) of the methods whose loss compares the Q/K/V of the
    teacher's layer with the student's at its relation site: the teacher's request, both Q/K/V,
    and `step_loss` = `combine(loss_terms(...))`. The method sets `relation_projection` (None at
    the last-layer site) and defines `loss_terms` and `combine`."""

    def teacher_request(self) -> FeatureRequest:
        return FeatureRequest(qkv_layer=self.teacher.layer)

    def teacher_qkv(self, batch: dict) -> QKV:
        return self.teacher_features(batch).qkv

    def student_qkv(self, batch: dict) -> QKV:
        return student_qkv(self.student, self.relation_projection, self.student_inputs(batch))

    def step_loss(self, batch: dict) -> tuple:
        terms = self.loss_terms(self.teacher_qkv(batch), self.student_qkv(batch),
                                batch["attention_mask"])  # fmt: skip
        return self.combine(terms), terms


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise UserError(
            f"unknown method.reduction '{reduction}'; use one of {', '.join(REDUCTIONS)}"
        )
    return reduction


def check_relation_heads(relation_heads: int, teacher, student) -> int:
    """R must divide both hidden sizes (docs/methods.md section 2)."""
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
    unknown = sorted(set(weights) - {"qq", "kk", "vv"})
    if unknown:
        raise UserError(
            f"method.relation_weights has unknown terms {unknown}; the terms are qq, kk and vv"
        )
    if sum(weights.values()) <= 0:
        raise UserError(
            f"method.relation_weights={dict(weights)} must give qq, kk, vv with a "
            "positive sum; e.g. {qq: 1, kk: 1, vv: 1}"
        )
    return weights


def relation_settings(method) -> dict:
    """What summary.json and the provenance record of a MiniLM v2 style method's relations."""
    return {"relation_heads": method.relation_heads, "relation_weights": method.relation_weights,
            "relation_site": method.relation_site, "reduction": method.reduction}  # fmt: skip


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


def weighted_relation(terms: dict, weights: dict):
    """(w_qq KL_QQ + w_kk KL_KK + w_vv KL_VV) / (w_qq + w_kk + w_vv)."""
    total = sum(weights.values())
    return sum(weights[n] * terms[n] for n in ("qq", "kk", "vv") if n in terms) / total
