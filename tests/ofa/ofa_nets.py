"""The tiny once-for-all family of the OFA tests (a module of its own: test files import it by name)."""

from __future__ import annotations

from transformers import BertConfig

LAYERS, HIDDEN = [3, 2, 1], [64, 48, 32]


def tiny_bert_config(vocab_size: int = 120) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=40,
        initializer_range=0.2,  # wide init: attention far from uniform
        attn_implementation="sdpa",
    )
