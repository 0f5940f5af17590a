"""Q/K/V capture and teacher loading against an untouched Hugging Face forward pass."""

import pytest
import torch
from transformers import AutoModel

from lmdistill.errors import UserError
from lmdistill.models import forward_qkv, load_teacher


def _reference_qkv(model_dir, layer_index, batch):
    """Q/K/V of a layer from an unmodified full model, via forward hooks on the Linear modules."""
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    attention = model.encoder.layer[layer_index].attention.self
    captured = {}
    for name in ("query", "key", "value"):
        getattr(attention, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.setdefault(name, out)
        )
    with torch.no_grad():
        model(**batch)
    return captured


@pytest.mark.parametrize("layer", [1, 2])
def test_teacher_qkv_equals_full_model(tiny_teacher_dir, padded_batch, layer):
    teacher = load_teacher(tiny_teacher_dir, layer=layer)
    qkv = teacher.qkv(**padded_batch)
    expected = _reference_qkv(tiny_teacher_dir, layer - 1, padded_batch)
    torch.testing.assert_close(qkv.query, expected["query"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.key, expected["key"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.value, expected["value"], atol=1e-5, rtol=1e-5)


def test_teacher_is_frozen_truncated_and_stops_at_the_distilled_layer(
    tiny_teacher_dir, padded_batch
):
    teacher = load_teacher(tiny_teacher_dir, layer=1)
    assert len(teacher.model.encoder.layer) == 1
    assert teacher.config.num_hidden_layers == 2  # the full config is kept for students
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    calls = []
    teacher.model.encoder.layer[0].attention.output.register_forward_hook(
        lambda *a: calls.append(1)
    )
    teacher.model.encoder.layer[0].intermediate.register_forward_hook(lambda *a: calls.append(1))
    qkv = teacher.qkv(**padded_batch)
    assert calls == []  # the distilled layer's attention output and FFN are never computed
    assert qkv.query.is_inference()


def test_student_capture_keeps_the_graph(tiny_teacher_dir, padded_batch):
    model = AutoModel.from_pretrained(tiny_teacher_dir).train()
    qkv = forward_qkv(model, 1, **padded_batch)
    qkv.value.sum().backward()
    assert model.encoder.layer[0].output.dense.weight.grad is not None
    assert model.encoder.layer[1].output.dense.weight.grad is None


def test_real_offline_teacher_loads_truncated(minilm_dir, padded_batch):
    teacher = load_teacher(minilm_dir, layer=4, dtype=torch.bfloat16)
    qkv = teacher.qkv(**padded_batch)
    assert qkv.key.shape == (3, 12, 384) and qkv.key.dtype == torch.bfloat16
    assert len(teacher.model.encoder.layer) == 4


@pytest.mark.parametrize(
    ("path", "layer", "message"),
    [
        ("/nonexistent/teacher", None, "does not exist"),
        ("./missing-model-dir", None, "does not exist"),
    ],
)
def test_teacher_path_errors(path, layer, message):
    with pytest.raises(UserError, match=message):
        load_teacher(path, layer=layer)


def test_teacher_layer_out_of_range(tiny_teacher_dir):
    with pytest.raises(UserError, match=r"outside 1\.\.2"):
        load_teacher(tiny_teacher_dir, layer=3)
