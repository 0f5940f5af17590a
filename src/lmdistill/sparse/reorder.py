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

    model: a BERT-family encoder (`BertModel`, RoBERTa, ...) or one with BERT's MLM head
    (`...ForMaskedLM`); head_order [layers, A], neuron_order [layers, I], hidden_order [d]:
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
    head = getattr(model, "cls", None)
    if head is not None:
        predictions = getattr(head, "predictions", None)
        if predictions is None or getattr(head, "seq_relationship", None) is not None:
            raise UserError(
                f"cannot reorder the heads of {type(model).__name__}; load the encoder alone "
                "(AutoModel) or with its MLM head (AutoModelForMaskedLM)"
            )
        _linear(predictions.transform.dense, h, h, done)
        _norm(predictions.transform.LayerNorm, h, done)
        decoder = predictions.decoder.weight  # [V, d], usually tied to the word embeddings
        if id(decoder) not in done:
            _permute(decoder, 1, h, done)
    untouched = [n for n, p in model.named_parameters() if id(p) not in done]
    untouched = [n for n in untouched if not n.endswith(("predictions.bias", "decoder.bias"))]
    if untouched:
        raise UserError(
            f"cannot reorder {type(model).__name__}: parameters {untouched[:3]} are not part of "
            "a BERT encoder or MLM head; sparsify a BERT, RoBERTa or XLM-R style model"
        )
    return model
