"""The builder of once-for-all super-net students (a `_target_` for the `student` config group)."""

from __future__ import annotations

from lmdistill.errors import UserError
from lmdistill.models.builders import MoESettings, encoder_student
from lmdistill.models.ofa_model import OFABertModel
from lmdistill.models.teacher import Teacher


def ofa_student(
    teacher: Teacher,
    num_hidden_layers: int = 6,
    hidden_size: int = 768,
    num_attention_heads: int = 12,
    intermediate_size: int | None = None,
    hidden_dropout_prob: float = 0.1,
    attention_probs_dropout_prob: float = 0.1,
    init_from_teacher: bool | str = False,
    ofa_layers: list[int] | None = None,
    ofa_hidden: list[int] | None = None,
    **_ignored,
) -> OFABertModel:
    """A super-net of this shape (its largest sub-network) on the teacher's vocabulary, BERT init
    or (`init_from_teacher`) the teacher's embeddings and uniformly spaced layers (or, with
    "embeddings", the embeddings only); family
    `ofa_layers` x `ofa_hidden` (None: the full size only). BERT teachers only: the super-net's
    embeddings are BERT's. `**_ignored` takes the other student fields (relation_site, moe)."""
    if teacher.config.model_type != "bert":
        raise UserError(
            f"once-for-all super-nets are BERT encoders but the teacher is a "
            f"{teacher.config.model_type!r} model; use a BERT teacher (e.g. teacher=bert-base-uncased)"
        )
    moe = _ignored.get("moe")
    if not (moe if isinstance(moe, MoESettings) else MoESettings(**(moe or {}))).dense:
        raise UserError("once-for-all super-nets are dense; use moe=1x1 with method=ofa_minilm")
    dense = encoder_student(
        teacher, num_hidden_layers, hidden_size, num_attention_heads, intermediate_size,
        hidden_dropout_prob, attention_probs_dropout_prob, init_from_teacher,
    )  # fmt: skip
    ofa_layers = [int(x) for x in ofa_layers] if ofa_layers is not None else None
    ofa_hidden = [int(x) for x in ofa_hidden] if ofa_hidden is not None else None
    return OFABertModel.from_dense(dense, ofa_layers, ofa_hidden)
