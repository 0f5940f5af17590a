"""Slice a reordered model into a physically smaller sparse student.

After `reorder_model`, the units a plan keeps are the first ones along every axis, so each
weight of the sparse model is the leading block of the same-named weight of the reordered model
(`SparseBertModel` keeps BERT's parameter names): Q/K/V [h a, d'], O [d', h a], FFN [I, d'] and
[d', I], embedding tables [rows, d'], LayerNorms [d'], pooler and MLM transform [d', d'], MLM
decoder [V, d'] (still tied to the word embeddings), MLM bias [V]. A layer left with no heads
(no neurons) has no attention (FFN) sublayer. RoBERTa and XLM-R encoders have BERT's names too;
their MLM head (`lm_head`: BERT's computation) is sliced into BERT's by its structure.
"""

from __future__ import annotations

import torch
from torch import nn

from lmdistill.errors import UserError
from lmdistill.models.sparse_config import SparseBertConfig
from lmdistill.models.sparse_model import SparseBertForMaskedLM, SparseBertModel
from lmdistill.sparse.reorder import mlm_head_parts
from lmdistill.sparse.schedule import SparsityPlan

# fields of the source config that the sparse config keeps (BERT family)
_KEEP = (
    "vocab_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
    "pad_token_id", "classifier_dropout",
)  # fmt: skip


def sparse_config(config, plan: SparsityPlan, padded_positions: bool = False) -> SparseBertConfig:
    """The sparse student's config: `config`'s vocabulary and settings, the plan's shape;
    `padded_positions` where the source numbers positions as RoBERTa does."""
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
        padded_positions=padded_positions,
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

    model: a BERT-family encoder, or one with its MLM head (BERT's, RoBERTa's, XLM-R's: then a
    `SparseBertForMaskedLM` with the head sliced into BERT's and tied). Embeddings that number
    positions from the padding index (RoBERTa, XLM-R) stay so (`padded_positions`). The result
    is in eval mode, in float32 like the source.
    """
    base = model.base_model
    has_mlm = model.get_output_embeddings() is not None
    padded = hasattr(base.embeddings, "create_position_ids_from_input_ids")  # RoBERTa's scheme
    config = sparse_config(model.config, plan, padded_positions=padded)
    cls = SparseBertForMaskedLM if has_mlm else SparseBertModel
    kwargs = {} if has_mlm else {"add_pooling_layer": getattr(base, "pooler", None) is not None}
    student = cls._from_config(config, attn_implementation="sdpa", **kwargs)
    _load_leading_blocks(student.base_model, base.state_dict(), type(model).__name__)
    if has_mlm:
        transform, norm, decoder = mlm_head_parts(model)
        if decoder.weight is not base.get_input_embeddings().weight:
            raise UserError(
                f"cannot slice {type(model).__name__}: its MLM decoder is not tied to the word "
                "embeddings; slice its encoder alone (AutoModel)"
            )
        predictions, head = student.cls.predictions, f"the MLM head of {type(model).__name__}"
        _load_leading_blocks(predictions.transform.dense, transform.state_dict(), head)
        _load_leading_blocks(predictions.transform.LayerNorm, norm.state_dict(), head)
        predictions.bias.copy_(decoder.bias)  # [V]
        student.tie_weights()  # the decoder: the sliced word embeddings
    return student.eval()


def _load_leading_blocks(target: nn.Module, source: dict, what: str) -> None:
    """Load into `target` the leading block of each same-named tensor of `source`."""
    missing = [k for k in target.state_dict() if k not in source]
    if missing:
        raise UserError(
            f"cannot slice {what}: no weights for {missing[:3]}; slice a BERT style encoder "
            "(or one with its MLM head) reordered by lmdistill-sparsify"
        )
    state = {
        k: leading_block(source[k], v.shape).to(v.dtype) for k, v in target.state_dict().items()
    }
    target.load_state_dict(state, strict=True)
