"""Dense BERT-family students on the teacher's vocabulary."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from lmdistill.errors import UserError
from lmdistill.models.capture import encoder_layers


def student_config(
    teacher_config: PretrainedConfig,
    num_hidden_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int | None = None,
    hidden_dropout_prob: float = 0.1,
    attention_probs_dropout_prob: float = 0.1,
) -> PretrainedConfig:
    """The teacher's config (same architecture, vocabulary, positions) with the student's shape."""
    for name, value in (
        ("num_hidden_layers", num_hidden_layers),
        ("hidden_size", hidden_size),
        ("num_attention_heads", num_attention_heads),
    ):
        if int(value) < 1:
            raise UserError(
                f"student.{name}={value} must be a positive integer; fix the student shape"
            )
    if hidden_size % num_attention_heads:
        raise UserError(
            f"student.hidden_size={hidden_size} is not divisible by "
            f"student.num_attention_heads={num_attention_heads}; choose heads that divide the hidden size"
        )
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = int(num_hidden_layers)
    config.hidden_size = int(hidden_size)
    config.num_attention_heads = int(num_attention_heads)
    config.intermediate_size = int(intermediate_size or 4 * hidden_size)
    config.hidden_dropout_prob = float(hidden_dropout_prob)
    config.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
    config.architectures = None
    return config


def teacher_init(value) -> str | None:
    """What `student.init_from_teacher` copies: None (BERT init), "layers" (true: embeddings and
    uniformly spaced layers) or "embeddings" (the embedding layer only; the rest BERT init)."""
    if value is False or value is None:
        return None
    if value is True:
        return "layers"
    if value == "embeddings":
        return "embeddings"
    raise UserError(
        f"student.init_from_teacher={value!r} is not one of false, true, embeddings; "
        "use false (random init), true (embeddings and layers) or embeddings (embeddings only)"
    )


def build_student(
    teacher_config: PretrainedConfig,
    init_from_teacher: torch.nn.Module | None = None,
    **shape,
) -> PreTrainedModel:
    """A randomly initialised (BERT init) student of `shape` (the arguments of `student_config`).

    With `init_from_teacher`, embeddings and the teacher layers of `layer_mapping` are copied
    (same widths only; a deeper student repeats teacher layers).
    """
    config = student_config(teacher_config, **shape)
    student = AutoModel.from_config(config, attn_implementation="sdpa")
    if init_from_teacher is not None:
        copy_teacher_layers(init_from_teacher, student)
    return student


def layer_mapping(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer (0-based) each student layer is initialised from.

    Shallower or equal student (S <= T): uniformly spaced teacher layers, student layer j takes
    teacher layer floor((j + 1) * T / S + 1/2) - 1 (halves round up, so T = 12, S = 8 gives
    1, 2, 4, 5, 7, 8, 10, 11), and the last student layer takes the last teacher layer (T = S:
    the identity). Deeper student (S > T): each teacher layer in order, repeated
    on consecutive student layers, student layer j takes teacher layer floor(j * T / S) (T = 6,
    S = 12: 0, 0, 1, 1, ..., 5, 5). Both are non-decreasing and use the last teacher layer.
    """
    t, s = int(teacher_layers), int(student_layers)
    if t < 1 or s < 1:
        raise UserError(f"cannot map {t} teacher layers onto {s} student layers; both must be >= 1")
    if s <= t:
        return [(2 * (j + 1) * t + s) // (2 * s) - 1 for j in range(s)]
    return [j * t // s for j in range(s)]


def copy_teacher_layers(teacher: torch.nn.Module, student: PreTrainedModel) -> list[int]:
    """Copy embeddings and the teacher layers of `layer_mapping` into the student; returns the
    mapping (student layer j <- teacher layer mapping[j]). Widths must match exactly."""
    t_layers, s_layers = encoder_layers(teacher), encoder_layers(student)
    t_shape = _shape(teacher.config)
    if t_shape != _shape(student.config):
        raise UserError(
            f"cannot initialise the student from the teacher: widths differ (teacher hidden/heads/FFN "
            f"{t_shape}, student {_shape(student.config)}); set student.init_from_teacher=false"
        )
    mapping = layer_mapping(len(t_layers), len(s_layers))
    with torch.no_grad():
        student.embeddings.load_state_dict(teacher.embeddings.state_dict())
        for j, t in enumerate(mapping):
            s_layers[j].load_state_dict(t_layers[t].state_dict())
    return mapping


def copy_teacher_embeddings(teacher: torch.nn.Module, student: PreTrainedModel) -> None:
    """Copy the teacher's embedding layer (words, positions, token types, LayerNorm) into the
    student; the hidden sizes must match."""
    t, s = teacher.config.hidden_size, student.config.hidden_size
    if t != s:
        raise UserError(
            f"cannot copy the teacher's embeddings: hidden sizes differ (teacher {t}, student "
            f"{s}); set student.init_from_teacher=false"
        )
    with torch.no_grad():
        student.embeddings.load_state_dict(teacher.embeddings.state_dict())


def _shape(config: PretrainedConfig) -> tuple[int, int, int]:
    return (config.hidden_size, config.num_attention_heads, config.intermediate_size)
