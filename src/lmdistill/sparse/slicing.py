"""Slice a reordered model into a physically smaller sparse student.

After `reorder_model`, the units a plan keeps are the first ones along every axis, so each
weight of the sparse model is the leading block of the same-named weight of the reordered model
(`SparseBertModel` keeps BERT's parameter names): Q/K/V [h a, d'], O [d', h a], FFN [I, d'] and
[d', I], embedding tables [rows, d'], LayerNorms [d'], pooler and MLM transform [d', d'], MLM
decoder [V, d'] (still tied to the word embeddings), MLM bias [V]. A layer left with no heads
(no neurons) has no attention (FFN) sublayer.
"""

from __future__ import annotations

import torch
from torch import nn

from lmdistill.errors import UserError
from lmdistill.models.sparse_config import SparseBertConfig
from lmdistill.models.sparse_model import SparseBertForMaskedLM, SparseBertModel
from lmdistill.sparse.schedule import SparsityPlan

# fields of the source config that the sparse config keeps (BERT family)
_KEEP = (
    "vocab_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
    "pad_token_id", "classifier_dropout",
)  # fmt: skip


def sparse_config(config, plan: SparsityPlan) -> SparseBertConfig:
    """The sparse student's config: `config`'s vocabulary and settings, the plan's shape."""
    heads, width = plan.layer_heads, plan.layer_intermediate
    if len(heads) != config.num_hidden_layers or len(width) != config.num_hidden_layers:
        raise UserError(
            f"the sparsity plan has {len(heads)} layers but the model {config.num_hidden_layers}; "
            "plan from this model's importance scores"
        )
    return SparseBertConfig(
        **{k: getattr(config, k) for k in _KEEP if getattr(config, k, None) is not None},
        hidden_size=int(plan.hidden_size),
        num_hidden_layers=int(config.num_hidden_layers),
        num_attention_heads=max(max(heads), 1),
        intermediate_size=max(max(width), 1),
        head_size=config.hidden_size // config.num_attention_heads,
        layer_heads=list(heads),
        layer_intermediate=list(width),
        sparsity=float(plan.sparsity),
    )


def leading_block(source: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """source[:shape[0], :shape[1], ...], a copy."""
    if source.dim() != len(shape) or any(s < t for s, t in zip(source.shape, shape, strict=True)):
        raise UserError(
            f"cannot slice a weight of shape {tuple(source.shape)} to {tuple(shape)}; "
            "slice the unpruned reordered model"
        )
    return source[tuple(slice(0, n) for n in shape)].clone()


@torch.no_grad()
def slice_model(model: nn.Module, plan: SparsityPlan) -> SparseBertModel | SparseBertForMaskedLM:
    """The sparse student of `plan` carved from `model` (reordered, most important first).

    model: a BERT-family encoder, or one with BERT's MLM head (then a `SparseBertForMaskedLM`
    with the head sliced and tied). The result is in eval mode, in float32 like the source.
    """
    has_mlm = getattr(model, "cls", None) is not None
    config = sparse_config(model.config, plan)
    cls = SparseBertForMaskedLM if has_mlm else SparseBertModel
    kwargs = {} if has_mlm else {"add_pooling_layer": getattr(model, "pooler", None) is not None}
    student = cls._from_config(config, attn_implementation="sdpa", **kwargs)
    source = model.state_dict()
    target = student.state_dict()
    missing = [k for k in target if k not in source]
    if missing:
        raise UserError(
            f"cannot slice {type(model).__name__}: no weights for {missing[:3]}; slice a BERT "
            "style encoder (or one with BERT's MLM head) reordered by lmdistill-sparsify"
        )
    state = {k: leading_block(source[k], v.shape).to(v.dtype) for k, v in target.items()}
    student.load_state_dict(state, strict=True)
    if has_mlm:
        student.tie_weights()
    return student.eval()
