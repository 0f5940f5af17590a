"""TinyBERT general distillation (docs/methods.md section 8).

    L = MSE_emb(W h_s^0, h_t^0) + sum_m MSE(W h_s^m, h_t^g(m)) + sum_m MSE(S_s^m, S_t^g(m))

h^0 the embedding output, h^m the output of layer m, S^m the pre-softmax attention scores
[B, A, L, L] of layer m, W a learned `Linear(d_s, d_t)` (dropped at export), g the layer mapping
(student layer m -> teacher layer g(m), uniform by default). Every MSE is a float32 mean over
valid elements: real tokens for hidden states, pairs of a real query and a real key for scores.
"""

from __future__ import annotations

import torch
from torch import nn

from lmdistill.errors import UserError
from lmdistill.losses import hidden_mse
from lmdistill.methods.base import DistillationMethod
from lmdistill.models.features import FeatureRequest, forward_features
from lmdistill.models.student import layer_mapping as uniform_mapping


def score_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of [B, A, L, L] attention scores over the pairs (real query, real key),
    in float32; masked by multiplication (no host read)."""
    with torch.autocast(student.device.type, enabled=False):
        real = (mask != 0).to(torch.float32)  # [B, L]
        pairs = (real[:, :, None] * real[:, None, :])[:, None]  # [B, 1, L, L]
        err = (student.float() - teacher.detach().float()).square() * pairs
        return err.sum() / (pairs.sum() * student.shape[1]).clamp_min(1.0)


def check_mapping(mapping: list[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-indexed) of each student layer; None: uniform (TinyBERT's g(m) = m T/S)."""
    if mapping is None:
        return [t + 1 for t in uniform_mapping(teacher_layers, student_layers)]
    if (
        not isinstance(mapping, (list, tuple))
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in mapping)
        or len(mapping) != student_layers
        or not all(1 <= t <= teacher_layers for t in mapping)
    ):
        raise UserError(
            f"method.layer_mapping={mapping} must give one teacher layer in 1..{teacher_layers} "
            f"for each of the {student_layers} student layers, or be null (uniform)"
        )
    return list(mapping)


class TinyBERT(DistillationMethod):
    """Hidden-state and attention-score distillation of mapped layers, plus the embeddings.

    Teacher and student need the same number of attention heads (scores are compared head by
    head); widths may differ. The teacher's layers are 1..`teacher.layer`.
    """

    def __init__(
        self,
        teacher,
        student,
        layer_mapping: list[int] | None = None,
        relation_site: str | None = None,
        optim: dict | None = None,
    ):
        heads_t, heads_s = teacher.num_attention_heads, student.config.num_attention_heads
        if heads_t != heads_s:
            raise UserError(
                f"TinyBERT compares attention scores head by head: the teacher has {heads_t} "
                f"heads, the student {heads_s}; set student.num_attention_heads={heads_t}"
            )
        if relation_site is not None:
            raise UserError(
                f"method=tinybert reads hidden states and attention scores, not a relation site; "
                f"remove student.relation_site={relation_site}"
            )
        super().__init__(teacher, student, optim)
        self.layer_mapping = check_mapping(layer_mapping, student.config.num_hidden_layers,
                                           teacher.layer)  # fmt: skip
        self.projection = nn.Linear(student.config.hidden_size, teacher.hidden_size)  # W

    def teacher_request(self) -> FeatureRequest:
        layers = tuple(sorted(set(self.layer_mapping)))
        return FeatureRequest(hidden_layers=(0, *layers), score_layers=layers)

    def student_request(self) -> FeatureRequest:
        layers = tuple(range(1, self.student.config.num_hidden_layers + 1))
        return FeatureRequest(hidden_layers=(0, *layers), score_layers=layers)

    def step_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        teacher = self.teacher_features(batch)
        student = forward_features(
            self.student, self.student_request(), **self.student_inputs(batch)
        )
        mask = batch["attention_mask"]  # [B, L]
        terms = {
            "embeddings": hidden_mse(self.projection(student.hidden[0]), teacher.hidden[0], mask),
            "hidden": sum(
                hidden_mse(self.projection(student.hidden[m]), teacher.hidden[t], mask)
                for m, t in enumerate(self.layer_mapping, start=1)
            ),
            "attention": sum(
                score_mse(student.scores[m], teacher.scores[t], mask)
                for m, t in enumerate(self.layer_mapping, start=1)
            ),
        }
        return terms["embeddings"] + terms["hidden"] + terms["attention"], terms

    def summary_fields(self) -> dict:
        return {**super().summary_fields(), "layer_mapping": self.layer_mapping}
