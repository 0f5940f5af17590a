"""Structured masks on an unmodified Hugging Face BERT-family model (forward hooks).

Three masks, as in docs/methods.md section 6:

* head   [layers, A]: multiplies each head's context before the attention output projection;
* neuron [layers, I]: multiplies each FFN neuron after the activation;
* hidden [d], one for all layers: multiplies the embedding output, each sublayer's output before
  the residual, and every LayerNorm output (embeddings, layers, MLM head transform).

Masks at 1 leave the function unchanged; their gradients are the Taylor importances. A hidden
mask with zeros also drops the zeroed dims from the LayerNorm statistics (normalising over the
kept dims only), so a binary mask computes exactly what the physically sliced model computes.
At a mask without zeros (importance) the LayerNorms are the plain ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmdistill.models.capture import encoder_layers


@dataclass
class Masks:
    head: torch.Tensor  # [layers, A]
    neuron: torch.Tensor  # [layers, I]
    hidden: torch.Tensor  # [d]

    @classmethod
    def ones(cls, config, requires_grad: bool = False, device=None, dtype=torch.float32) -> Masks:
        """All-ones masks for a model of `config` (leaf tensors that may require grad)."""
        shapes = (
            (config.num_hidden_layers, config.num_attention_heads),
            (config.num_hidden_layers, config.intermediate_size),
            (config.hidden_size,),
        )
        return cls(
            *(
                torch.ones(s, device=device, dtype=dtype, requires_grad=requires_grad)
                for s in shapes
            )
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head, self.neuron, self.hidden


def masked_layer_norm(module: nn.LayerNorm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm of `x` [..., d] with statistics over the dims where `keep` [d] is True only."""
    w = keep.to(x.dtype)
    count = w.sum()
    mean = (x * w).sum(-1, keepdim=True) / count
    var = ((x - mean).square() * w).sum(-1, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + module.eps)
    return y * module.weight + module.bias


@contextlib.contextmanager
def apply_masks(model: nn.Module, masks: Masks) -> Iterator[nn.Module]:
    """Within the block, `model` (a BERT-family model, with or without an MLM head) is masked."""
    base = getattr(model, "base_model", model)
    layers = encoder_layers(base)
    d = base.config.hidden_size
    head_size = d // base.config.num_attention_heads
    hidden = masks.hidden
    has_zero = bool((hidden.detach() == 0).any())
    keep = hidden.detach() != 0

    def scale_hidden(_module, _args, out):
        return out * hidden.to(out.dtype)

    def norm_hidden(module, args, out):
        if has_zero:
            out = masked_layer_norm(module, args[0], keep)
        return out * hidden.to(out.dtype)

    handles = []
    for i, layer in enumerate(layers):
        head = masks.head[i].repeat_interleave(head_size)  # [A a]
        neuron = masks.neuron[i]  # [I]

        def scale_heads(_module, args, head=head):
            return (args[0] * head.to(args[0].dtype),)  # context [B, L, A a]

        def scale_neurons(_module, _args, out, neuron=neuron):
            return out * neuron.to(out.dtype)  # [B, L, I], after the activation

        projection = layer.attention.output.dense
        handles += [
            projection.register_forward_pre_hook(scale_heads),
            projection.register_forward_hook(scale_hidden),  # attention output, before residual
            layer.intermediate.register_forward_hook(scale_neurons),
            layer.output.dense.register_forward_hook(scale_hidden),  # FFN output, before residual
        ]
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (d,):
            handles.append(module.register_forward_hook(norm_hidden))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
