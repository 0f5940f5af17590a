"""Reorder a BERT-family model's heads, FFN neurons and hidden dims, most important first.

A permutation of weights that keeps the model's function: MLM logits are unchanged, and every
hidden feature (last_hidden_state, pooler_output) comes out in the new hidden order,
`reordered(x)[..., j] == original(x)[..., hidden_order[j]]`. After it, keeping the k most
important units of any kind is keeping the first k (`lmdistill.sparse.slicing`).
"""

from __future__ import annotations

import torch
from torch import nn

from lmdistill.errors import UserError
from lmdistill.models.capture import encoder_layers


def _permute(param: nn.Parameter, dim: int, index: torch.Tensor, done: set[int]) -> None:
    """Reorder `param` along `dim` in place (once: tied parameters are visited once)."""
    if param is None:
        return
    param.data = param.data.index_select(dim, index.to(param.device)).contiguous()
    done.add(id(param))


def _linear(layer: nn.Linear, out_index, in_index, done: set[int]) -> None:
    """weight [out, in], bias [out]: rows by `out_index`, columns by `in_index` (None: as is)."""
    if out_index is not None:
        _permute(layer.weight, 0, out_index, done)
        _permute(layer.bias, 0, out_index, done)
    if in_index is not None:
        _permute(layer.weight, 1, in_index, done)


def _norm(norm: nn.LayerNorm, index: torch.Tensor, done: set[int]) -> None:
    _permute(norm.weight, 0, index, done)
    _permute(norm.bias, 0, index, done)


@torch.no_grad()
def reorder_model(
    model: nn.Module,
    head_order: torch.Tensor,
    neuron_order: torch.Tensor,
    hidden_order: torch.Tensor,
) -> nn.Module:
    """Permute `model` in place and return it.

    model: a BERT-family encoder (`BertModel`, RoBERTa, ...) or one with its MLM head
    (`BertForMaskedLM`, `RobertaForMaskedLM`, ...); head_order [layers, A], neuron_order [layers, I], hidden_order [d]:
    the new position j takes the old unit order[j].
    """
    base = getattr(model, "base_model", model)
    layers = encoder_layers(base)
    a = base.config.hidden_size // base.config.num_attention_heads
    h = hidden_order.long()
    done: set[int] = set()
    emb = base.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        if table is not None:
            _permute(table.weight, 1, h, done)
    _norm(emb.LayerNorm, h, done)
    for i, layer in enumerate(layers):
        heads = head_order[i].long()
        cols = (heads[:, None] * a + torch.arange(a)).flatten()  # [A a]: head k's a columns
        attn = layer.attention
        for proj in (attn.self.query, attn.self.key, attn.self.value):
            _linear(proj, cols, h, done)
        _linear(attn.output.dense, h, cols, done)
        _norm(attn.output.LayerNorm, h, done)
        neurons = neuron_order[i].long()
        _linear(layer.intermediate.dense, neurons, h, done)
        _linear(layer.output.dense, h, neurons, done)
        _norm(layer.output.LayerNorm, h, done)
    if getattr(base, "pooler", None) is not None:
        _linear(base.pooler.dense, h, h, done)
    if model is not base:
        _reorder_mlm_head(model, h, done)
    untouched = [n for n, p in model.named_parameters() if id(p) not in done]
    if untouched:
        raise UserError(
            f"cannot reorder {type(model).__name__}: parameters {untouched[:3]} are not part of "
            "a BERT encoder or MLM head; sparsify a BERT, RoBERTa or XLM-R style model"
        )
    return model


def mlm_head_parts(model: nn.Module) -> tuple[nn.Linear, nn.LayerNorm, nn.Linear]:
    """(transform Linear(d, d), its LayerNorm(d), decoder [V, d] with its vocabulary bias [V]) of
    the MLM head of `model`: BERT's `cls.predictions`, RoBERTa's and XLM-R's `lm_head` (dense,
    GELU, LayerNorm, decoder: BERT's computation), found by structure."""
    base, decoder = model.base_model, model.get_output_embeddings()
    d = model.config.hidden_size
    head = [m for child in model.children() if child is not base for m in child.modules()]
    dense = [m for m in head if isinstance(m, nn.Linear) and m.weight.shape == (d, d)]
    norms = [m for m in head if isinstance(m, nn.LayerNorm)]
    if decoder is None or decoder.bias is None or len(dense) != 1 or len(norms) != 1:
        raise UserError(
            f"{type(model).__name__} has no MLM head of a transform, a LayerNorm and a decoder; "
            "load the encoder alone (AutoModel) or with its MLM head (AutoModelForMaskedLM)"
        )
    return dense[0], norms[0], decoder


def _reorder_mlm_head(model: nn.Module, h: torch.Tensor, done: set[int]) -> None:
    transform, norm, decoder = mlm_head_parts(model)
    _linear(transform, h, h, done)
    _norm(norm, h, done)
    if id(decoder.weight) not in done:  # usually tied to the word embeddings: reordered there
        _permute(decoder.weight, 1, h, done)
    done.add(id(decoder.bias))  # over the vocabulary: unchanged
