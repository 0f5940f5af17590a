"""The builders named by `_target_` in the `student` config group (teachers: `build_teacher`).

`encoder_student` builds a dense BERT-family student of the teacher's architecture, or, where
the `moe` group asks for experts, a MiniMoE student of the same shape (docs/methods.md
section 5). Sparse and once-for-all students get builders of their own beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from lmdistill.models.moe import MiniMoEModel, minimoe_config
from lmdistill.models.student import build_student, copy_teacher_embeddings, teacher_init
from lmdistill.models.teacher import Teacher


@dataclass
class MoESettings:
    """The `moe` config group (conf/moe/*.yaml)."""

    attention_experts: int = 1  # x: attention experts per layer (1 = dense attention)
    ffn_experts: int = 1  # y: FFN experts per layer (1 = dense FFN)
    balance_weight: float = 0.01  # weight of the load-balancing loss (read by method=minimoe)
    router_noise: float = 0.1  # U(-noise, noise) on router logits in training
    init: str = "carve"  # carve (original work) | independent

    @property
    def dense(self) -> bool:
        return int(self.attention_experts) == 1 and int(self.ffn_experts) == 1


def encoder_student(
    teacher: Teacher,
    num_hidden_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int | None = None,
    hidden_dropout_prob: float = 0.1,
    attention_probs_dropout_prob: float = 0.1,
    init_from_teacher: bool | str = False,
    moe: dict | MoESettings | None = None,
) -> PreTrainedModel:
    """A student of this shape on the teacher's vocabulary: dense for moe 1x1 (or None), else
    MiniMoE with the dense student's embeddings and dense sublayers. `init_from_teacher`: false,
    true (the teacher's embeddings and uniformly spaced layers) or "embeddings" (those only)."""
    init = teacher_init(init_from_teacher)
    dense = build_student(
        teacher.config, num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        hidden_dropout_prob=hidden_dropout_prob,
        attention_probs_dropout_prob=attention_probs_dropout_prob,
        init_from_teacher=teacher.model if init == "layers" else None,
    )  # fmt: skip
    if init == "embeddings":
        copy_teacher_embeddings(teacher.model, dense)
    settings = moe if isinstance(moe, MoESettings) else MoESettings(**(moe or {}))
    return dense if settings.dense else moe_student(dense, settings)


def moe_student(dense: PreTrainedModel, settings: MoESettings) -> MiniMoEModel:
    """A MiniMoE student of the dense student's shape.

    For BERT students, parameters with the same name and shape (embeddings, dense sublayers,
    pooler) are copied from `dense`, so `student.init_from_teacher` carries over; MoE sublayers
    are initialised by `settings.init`.
    """
    config = minimoe_config(
        dense.config, settings.attention_experts, settings.ffn_experts,
        settings.router_noise, settings.init,
    )  # fmt: skip
    student = MiniMoEModel._from_config(config, attn_implementation="sdpa")
    if getattr(dense.config, "model_type", None) == "bert":
        own = student.state_dict()
        same = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
        student.load_state_dict(same, strict=False)
    return student
