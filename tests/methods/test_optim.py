"""Weight decay by parameter role (not by shape): exactly the weight matrices and embeddings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmdistill.methods import MiniMoE
from lmdistill.methods.optim import decays
from lmdistill.models import MoESettings, build_student, load_teacher, moe_student


def test_minimoe_expert_biases_are_not_decayed_and_expert_weights_are(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    dense = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                          num_attention_heads=4, intermediate_size=64)  # fmt: skip
    student = moe_student(dense, MoESettings(attention_experts=2, ffn_experts=4))
    module = MiniMoE(teacher, student, relation_heads=4, optim={"weight_decay": 0.1})
    module.freeze_unreached()
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    decay, plain = module.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    name = {id(p): n for n, p in module.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    not_decayed = {name[id(p)] for p in plain["params"]}
    layer = "student.encoder.layer.0."
    # stacked expert biases are 2-D: a shape rule decays them
    for bias in ("attention.qkv_bias", "attention.out_bias", "ffn.in_bias", "ffn.out_bias"):
        assert layer + bias in not_decayed
    for weight in ("attention.qkv_weight", "attention.out_weight", "ffn.in_weight",
                   "ffn.out_weight", "ffn.router.classifier.weight"):  # fmt: skip
        assert layer + weight in decayed
    assert layer + "ffn.LayerNorm.weight" in not_decayed
    assert "student.embeddings.word_embeddings.weight" in decayed  # BERT recipe: decayed
    assert "student.embeddings.LayerNorm.weight" in not_decayed
    assert "relation_projection.weight" in decayed and "relation_projection.bias" in not_decayed


def test_a_parameter_without_a_role_is_refused():
    module = torch.nn.Module()
    module.scale = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="no weight-decay role for parameter 'scale'"):
        decays(module, "scale")
