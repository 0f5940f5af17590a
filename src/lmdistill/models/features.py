"""What a method reads from an encoder: Q/K/V of one layer, hidden states, attention scores.

A method states a `FeatureRequest`; `forward_features` runs the encoder unmodified (its fast SDPA
attention) with hooks that collect exactly those features and stop the forward pass after the
highest layer needed. Layers are 1-indexed; hidden state 0 is the embedding output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lmdistill.models.capture import QKV, StopForward, encoder_layers, forward_qkv, self_attention


@dataclass(frozen=True)
class FeatureRequest:
    """The features a method needs from a model (the teacher computes exactly these)."""

    qkv_layer: int | None = None  # Q/K/V projections (Linear outputs) of this layer
    hidden_layers: tuple[int, ...] = ()  # hidden states: 0 = embeddings, i = output of layer i
    score_layers: tuple[int, ...] = ()  # pre-softmax attention scores of layer i

    @property
    def top_layer(self) -> int:
        """The highest layer whose computation is needed (0: embeddings only)."""
        return max([self.qkv_layer or 0, *self.hidden_layers, *self.score_layers])


@dataclass
class Features:
    qkv: QKV | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L, d]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, A, L, L] float32


def attention_scores(layer: nn.Module, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """Q_h K_h^T / sqrt(a) of `layer` from its input `hidden` [B, L, d]: [B, A, L, L], float32,
    no mask (masking is the loss's job)."""
    attention = self_attention(layer)
    b, n, _ = hidden.shape
    q, k = attention.query(hidden), attention.key(hidden)  # [B, L, d]
    a = q.shape[-1] // heads
    with torch.autocast(hidden.device.type, enabled=False):
        q = q.float().view(b, n, heads, a).transpose(1, 2)  # [B, A, L, a]
        k = k.float().view(b, n, heads, a).transpose(1, 2)
        return q @ k.transpose(-1, -2) / math.sqrt(a)  # [B, A, L, L]


def forward_features(model: nn.Module, request: FeatureRequest, **inputs) -> Features:
    """Run `model(**inputs)` up to `request.top_layer` and return the requested features."""
    if not request.hidden_layers and not request.score_layers:
        qkv = forward_qkv(model, request.qkv_layer - 1, **inputs) if request.qkv_layer else None
        return Features(qkv=qkv)
    layers, top = encoder_layers(model), request.top_layer
    heads = model.config.num_attention_heads
    out, handles = Features(), []

    def keep_embeddings(_module, _args, output):
        out.hidden[0] = output
        if top == 0:
            raise StopForward(out)

    def before(i):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, L, d]
            if i in request.score_layers:
                out.scores[i] = attention_scores(layers[i - 1], hidden, heads)
            if i == request.qkv_layer:
                attention = self_attention(layers[i - 1])
                out.qkv = QKV(attention.query(hidden), attention.key(hidden),
                              attention.value(hidden))  # fmt: skip
            if i == top and i not in request.hidden_layers:
                raise StopForward(out)

        return hook

    def after(i):
        def hook(_module, _args, output):
            out.hidden[i] = output[0] if isinstance(output, tuple) else output
            if i == top:
                raise StopForward(out)

        return hook

    try:
        if 0 in request.hidden_layers:
            handles.append(model.embeddings.register_forward_hook(keep_embeddings))
        for i in range(1, top + 1):
            handles.append(layers[i - 1].register_forward_pre_hook(before(i), with_kwargs=True))
            if i in request.hidden_layers:
                handles.append(layers[i - 1].register_forward_hook(after(i)))
        model(**inputs)
    except StopForward:
        return out
    finally:
        for handle in handles:
            handle.remove()
    return out
