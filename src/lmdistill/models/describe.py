"""What a built student is: shape, experts, parameters and inference FLOPs (for summaries)."""

from __future__ import annotations

from torch import nn

from lmdistill.models.flops import encoder_gflops
from lmdistill.models.moe import MiniMoEConfig, minimoe_gflops
from lmdistill.models.sparse_config import SparseBertConfig
from lmdistill.models.sparse_model import sparse_gflops


def experts_of(model: nn.Module) -> tuple[int, int]:
    """(attention experts, FFN experts) per layer; (1, 1) for a dense student."""
    config = model.config
    if isinstance(config, MiniMoEConfig):
        return config.attention_experts, config.ffn_experts
    return 1, 1


def student_gflops(model: nn.Module, seq_len: int = 128) -> float:
    """Inference GFLOPs for one sequence (MiniMoE: one expert per sublayer per token plus the
    routers; sparse students: each layer's own heads and FFN width)."""
    c = model.config
    if isinstance(c, MiniMoEConfig):
        return minimoe_gflops(c, seq_len)
    if isinstance(c, SparseBertConfig):
        return sparse_gflops(c, seq_len)
    return encoder_gflops(c.num_hidden_layers, c.hidden_size, c.intermediate_size, seq_len)


def describe_student(model: nn.Module, seq_len: int = 128) -> dict:
    """The `student` entry of summary.json."""
    c = model.config
    attention_experts, ffn_experts = experts_of(model)
    return {
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": student_gflops(model, seq_len),
        "attention_experts": attention_experts,
        "ffn_experts": ffn_experts,
    }
