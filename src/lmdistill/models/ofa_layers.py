"""Weight-shared building blocks of the once-for-all super-net: each uses the leading block of
its weights, of the size set by `set_width` (the active sub-network).

The modules keep BERT's names and parameter shapes (`attention.self.query` is a `Linear` of the
full size), so a dense BERT's state dict loads into the super-net key by key, and a hook that
calls `layer.attention.self.query(hidden)` on the sub-network's hidden states [B, L, h] gets
the sub-network's projection [B, L, h] (lmdistill.models.capture works unchanged).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertEmbeddings

from lmdistill.models.ofa_config import OFABertConfig, SubnetShape


class OFALinear(nn.Linear):
    """`Linear` on the leading `active_in` inputs, producing the leading `active_out` outputs."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.active_in, self.active_out = in_features, out_features

    def set_width(self, active_in: int, active_out: int) -> None:
        self.active_in, self.active_out = active_in, active_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in'] -> [..., out']
        o, i = self.active_out, self.active_in
        return F.linear(x, self.weight[:o, :i], self.bias[:o])


class OFALayerNorm(nn.LayerNorm):
    """`LayerNorm` over the leading `active` dims, with the leading weights and biases."""

    def __init__(self, size: int, eps: float):
        super().__init__(size, eps=eps)
        self.active = size

    def set_width(self, active: int) -> None:
        self.active = active

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., h] -> [..., h]
        h = self.active
        return F.layer_norm(x, (h,), self.weight[:h], self.bias[:h], self.eps)


class OFABertEmbeddings(BertEmbeddings):
    """BERT embeddings whose sum is cut to the leading h dims before LayerNorm (over h)."""

    def __init__(self, config: OFABertConfig):
        super().__init__(config)
        self.LayerNorm = OFALayerNorm(config.hidden_size, config.layer_norm_eps)

    def set_width(self, hidden: int) -> None:
        self.LayerNorm.set_width(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.LayerNorm.active
        b, n = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = self.position_ids[:, :n]  # [1, L]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :n].expand(b, n)  # [B, L] zeros
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # [B, L, d]
        total = (
            inputs_embeds[..., :h]
            + self.token_type_embeddings(token_type_ids)[..., :h]
            + self.position_embeddings(position_ids)[..., :h]
        )  # [B, L, h]
        return self.dropout(self.LayerNorm(total))


class OFABertSelfAttention(nn.Module):
    """Q, K, V projections h -> h (h / a heads of a dims) and scaled dot-product attention."""

    def __init__(self, config: OFABertConfig):
        super().__init__()
        d = config.hidden_size
        self.head_size = config.head_size
        self.query, self.key, self.value = OFALinear(d, d), OFALinear(d, d), OFALinear(d, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = hidden.shape
        q, k, v = (
            x(hidden).view(b, n, -1, self.head_size).transpose(1, 2)
            for x in (self.query, self.key, self.value)
        )  # [B, h/a, L, a]
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # [B, h/a, L, a]
        return context.transpose(1, 2).reshape(b, n, -1)  # [B, L, h]


class OFABertResidual(nn.Module):
    """`LN(residual + Dropout(dense(x)))` over the leading h dims (`dense`: width -> h)."""

    def __init__(self, config: OFABertConfig, width: int):
        super().__init__()
        self.dense = OFALinear(width, config.hidden_size)
        self.LayerNorm = OFALayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))  # [B, L, h]


class OFABertAttention(nn.Module):
    def __init__(self, config: OFABertConfig):
        super().__init__()
        self.self = OFABertSelfAttention(config)
        self.output = OFABertResidual(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class OFABertIntermediate(nn.Module):
    def __init__(self, config: OFABertConfig):
        super().__init__()
        self.dense = OFALinear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden))  # [B, L, I']


class OFABertLayer(nn.Module):
    """A BERT layer (attention, then FFN) running at the width of `set_width`."""

    def __init__(self, config: OFABertConfig):
        super().__init__()
        self.attention = OFABertAttention(config)
        self.intermediate = OFABertIntermediate(config)
        self.output = OFABertResidual(config, config.intermediate_size)

    def set_width(self, shape: SubnetShape) -> None:
        h, i = shape.hidden, shape.intermediate
        for proj in (self.attention.self.query, self.attention.self.key, self.attention.self.value):
            proj.set_width(h, h)
        self.attention.output.dense.set_width(h, h)
        self.attention.output.LayerNorm.set_width(h)
        self.intermediate.dense.set_width(h, i)
        self.output.dense.set_width(i, h)
        self.output.LayerNorm.set_width(h)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.attention(hidden, mask)
        return self.output(self.intermediate(hidden), hidden)  # [B, L, h]


class OFABertPooler(nn.Module):
    """tanh(dense(first token)) over the leading h dims."""

    def __init__(self, config: OFABertConfig):
        super().__init__()
        self.dense = OFALinear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))  # [B, h]
