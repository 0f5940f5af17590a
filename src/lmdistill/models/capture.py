"""Capture the query, key and value projections of one encoder layer.

A forward pre-hook on `encoder.layer[i]` receives that layer's input hidden states, computes the
layer's own `attention.self.{query,key,value}` Linear outputs (bias included; MiniMoE attention
experts: each token's own expert, and the routing is recorded as the model's) and stops the
forward pass there by raising. Layers above `i`, and layer `i`'s attention output and FFN, are
never computed. The model itself runs unmodified with its fast (SDPA) attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lmdistill.errors import UserError


class QKV(NamedTuple):
    query: torch.Tensor  # [B, L, d]
    key: torch.Tensor  # [B, L, d]
    value: torch.Tensor  # [B, L, d]


class StopForward(Exception):
    """Raised by a hook once everything needed is captured: the rest is never computed."""

    def __init__(self, value):
        super().__init__("forward pass stopped after the captured layer")
        self.value = value


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a BERT-family encoder (BERT, RoBERTa, XLM-R, ...)."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "attention"):
        raise UserError(
            f"{type(model).__name__} is not a BERT-family encoder (no encoder.layer[i].attention); "
            "use a BERT, RoBERTa or XLM-R style model"
        )
    return layers


def self_attention(layer: nn.Module) -> nn.Module:
    """The module holding the `query`, `key` and `value` projections of a layer."""
    attention = layer.attention.self
    for name in ("query", "key", "value"):
        if not isinstance(getattr(attention, name, None), nn.Linear):
            raise UserError(
                f"{type(attention).__name__} has no Linear `{name}` projection; "
                "use a BERT, RoBERTa or XLM-R style model"
            )
    return attention


def forward_qkv(model: nn.Module, layer_index: int, **inputs: torch.Tensor) -> QKV:
    """Run `model(**inputs)` up to layer `layer_index` (0-based) and return its Q, K, V [B, L, d]."""
    layer = encoder_layers(model)[layer_index]
    attention = None if hasattr(layer.attention, "project_qkv") else self_attention(layer)

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, L, d]
        project = getattr(layer.attention, "project_qkv", None)  # MiniMoE attention experts
        if project is not None:  # its routing joins the pass's (load balance, logging)
            (q, k, v), stats, *_ = project(hidden, args[2])  # each token's own expert
            model.record_routing(layer_index, "attention", stats)
            raise StopForward(QKV(q, k, v))
        raise StopForward(
            QKV(attention.query(hidden), attention.key(hidden), attention.value(hidden))
        )

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except StopForward as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer_index} of {type(model).__name__} was never reached")
