"""Sparse students as Hugging Face models: `SparseBertModel`, `...ForSequenceClassification`,
`...ForMaskedLM`.

A BERT encoder whose layers keep their own number of attention heads and FFN neurons (what
structured pruning leaves, docs/methods.md section 6), on a reduced hidden size d' shared by the
embeddings and every layer. A layer with no heads skips its attention sublayer; one with no
neurons skips its FFN. Module and parameter names are BERT's (`encoder.layer.3.attention.self
.query`, ...), so a reordered BERT slices into it key by key (`lmdistill.sparse.slicing`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
)
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertPooler,
)
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

from lmdistill.models.bert_style import BertStyleEncoder, BertStylePreTrainedModel
from lmdistill.models.classification import EncoderForSequenceClassification
from lmdistill.models.sparse_config import SparseBertConfig


class SparseBertSelfAttention(nn.Module):
    """Q, K, V projections d' -> h a and scaled dot-product attention over h heads."""

    def __init__(self, config: SparseBertConfig, heads: int):
        super().__init__()
        self.num_heads, self.head_size = heads, config.head_size
        width = heads * config.head_size
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        self.value = nn.Linear(config.hidden_size, width)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = hidden.shape
        q, k, v = (
            x(hidden).view(b, n, self.num_heads, self.head_size).transpose(1, 2)
            for x in (self.query, self.key, self.value)
        )  # [B, h, L, a]
        context = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # [B, h, L, a]
        return context.transpose(1, 2).reshape(b, n, -1)  # [B, L, h a]


class SparseBertResidual(nn.Module):
    """`LN(residual + Dropout(dense(x)))`: the output of a sublayer (`dense`: width -> d')."""

    def __init__(self, config: SparseBertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))  # [B, L, d']


class SparseBertAttention(nn.Module):
    def __init__(self, config: SparseBertConfig, heads: int):
        super().__init__()
        self.self = SparseBertSelfAttention(config, heads)
        self.output = SparseBertResidual(config, heads * config.head_size)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class SparseBertIntermediate(nn.Module):
    def __init__(self, config: SparseBertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, width)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden))  # [B, L, I_l]


class SparseBertLayer(nn.Module):
    """Attention (h heads, or none) then FFN (I neurons, or none)."""

    def __init__(self, config: SparseBertConfig, heads: int, intermediate: int):
        super().__init__()
        self.attention = SparseBertAttention(config, heads) if heads > 0 else None
        if intermediate > 0:
            self.intermediate = SparseBertIntermediate(config, intermediate)
            self.output = SparseBertResidual(config, intermediate)
        else:
            self.intermediate = self.output = None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.attention is not None:
            hidden = self.attention(hidden, mask)
        if self.intermediate is not None:
            hidden = self.output(self.intermediate(hidden), hidden)
        return hidden  # [B, L, d']


class SparseBertPreTrainedModel(BertStylePreTrainedModel):
    config_class = SparseBertConfig
    config: SparseBertConfig
    _no_split_modules = ["BertEmbeddings", "RobertaEmbeddings", "SparseBertLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """BERT init, the MLM head's bias zero."""
        super()._init_weights(module)
        if isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)


class SparseBertModel(BertStyleEncoder, SparseBertPreTrainedModel):
    """BERT embeddings (width d'; RoBERTa's with `padded_positions`) + sparse layers (+ pooler
    d' -> d')."""

    def __init__(self, config: SparseBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        embeddings = RobertaEmbeddings if config.padded_positions else BertEmbeddings
        self.embeddings = embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            SparseBertLayer(config, h, i)
            for h, i in zip(config.layer_heads, config.layer_intermediate, strict=True)
        )
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        hidden = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)  # [B, L, d']
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )  # [B, 1, L, L] or None (no padding)
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class SparseBertForSequenceClassification(
    EncoderForSequenceClassification, SparseBertPreTrainedModel
):
    """SparseBertModel + dropout + linear classifier on the pooled output (as BERT)."""

    encoder_class = SparseBertModel


class SparseBertForMaskedLM(SparseBertPreTrainedModel):
    """SparseBertModel + BERT's MLM head on d'; the decoder is tied to the word embeddings."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        self.bert = SparseBertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        hidden = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        logits = self.cls(hidden)  # [B, L, V]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits)


def sparse_gflops(config: SparseBertConfig, seq_len: int = 128) -> float:
    """Inference GFLOPs of one sequence through the encoder's layers (2 per multiply-add).

    The convention of `encoder_gflops`, layer by layer: h heads of size a and I neurons on
    hidden d' cost 4 d' h a (Q, K, V, O) + 2 L h a (scores and context) + 2 d' I per token.
    Equals `encoder_gflops` for an unpruned shape.
    """
    d, a, n = config.hidden_size, config.head_size, seq_len
    per_token = sum(
        4 * d * h * a + 2 * n * h * a + 2 * d * i
        for h, i in zip(config.layer_heads, config.layer_intermediate, strict=True)
    )
    return 2.0 * n * per_token / 1e9


def sparse_params(config: SparseBertConfig, pooler: bool = True) -> int:
    """Parameters of `SparseBertModel(config)` (embeddings, layers, pooler), counted analytically."""
    d, a = config.hidden_size, config.head_size
    rows = config.vocab_size + config.max_position_embeddings + config.type_vocab_size
    total = rows * d + 2 * d  # embedding tables and their LayerNorm
    for h, i in zip(config.layer_heads, config.layer_intermediate, strict=True):
        if h:
            total += 3 * (d * h * a + h * a) + h * a * d + d + 2 * d  # Q, K, V, O, LayerNorm
        if i:
            total += d * i + i + i * d + d + 2 * d  # in, out, LayerNorm
    return total + (d * d + d if pooler else 0)
