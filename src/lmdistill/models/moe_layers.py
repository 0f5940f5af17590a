"""MiniMoE sublayers: mixture-of-experts attention and FFN, and the layer that holds them.

A sublayer with E > 1 experts computes `LN(h + gamma * Dropout(Expert_e(h)))` with e the
router's hard top-1 choice for each token and gamma its probability (docs/methods.md section 5).
A sublayer with E = 1 is the plain Hugging Face BERT sublayer (same modules, same names), so a
1x1 MiniMoE student is a dense BERT.

Attention experts (our reading of "attention experts own Q, K, V, O; attention spans all
tokens"): every token is routed once per layer; its query, key and value are projected by its
expert's Q, K, V; attention (SDPA) then runs over the whole sequence with these mixed keys and
values, exactly as in a dense layer; the token's context is projected by the same expert's O and
scaled by the gate. Per-token FLOPs equal the dense layer's plus the router.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from lmdistill.models.moe_config import MiniMoEConfig
from lmdistill.models.moe_routing import (
    MiniMoERouter,
    RoutingStats,
    dispatch,
    grouped_linear,
    permute_rows,
    unpermute_rows,
)


class MiniMoEFeedForward(nn.Module):
    """E FFN experts of width I each: [E, d, I] and [E, I, d] stacked weights, one router."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        d, i, e = config.hidden_size, config.intermediate_size, config.ffn_experts
        self.num_experts = e
        self.router = MiniMoERouter(d, e, config.router_noise)
        self.in_weight = nn.Parameter(torch.empty(e, d, i))  # [E, d, I]
        self.in_bias = nn.Parameter(torch.empty(e, i))  # [E, I]
        self.out_weight = nn.Parameter(torch.empty(e, i, d))  # [E, I, d]
        self.out_bias = nn.Parameter(torch.empty(e, d))  # [E, d]
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(
        self, hidden: torch.Tensor, real: torch.Tensor
    ) -> tuple[torch.Tensor, RoutingStats]:
        b, n, d = hidden.shape
        flat = hidden.reshape(b * n, d)  # [N, d]
        stats, gate = self.router(flat, real)
        route = dispatch(stats.expert, self.num_experts)  # no host sync
        x = permute_rows(flat, route.order)  # [N, d], grouped by expert, padding last
        x = self.act(grouped_linear(x, self.in_weight, self.in_bias, route))  # [N, I]
        x = grouped_linear(x, self.out_weight, self.out_bias, route)  # [N, d], padding rows 0
        x = x * permute_rows(gate, route.order)[:, None].to(x.dtype)
        out = unpermute_rows(x, route.order).view(b, n, d)  # padding positions 0
        return self.LayerNorm(hidden + self.dropout(out)), stats


class MiniMoEAttention(nn.Module):
    """E attention experts of A heads each: stacked [E, d, 3d] Q/K/V and [E, d, d] O, one router."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        d, e = config.hidden_size, config.attention_experts
        self.num_experts = e
        self.num_heads = config.num_attention_heads
        self.router = MiniMoERouter(d, e, config.router_noise)
        self.qkv_weight = nn.Parameter(torch.empty(e, d, 3 * d))  # [E, d, 3d]: Q | K | V
        self.qkv_bias = nn.Parameter(torch.empty(e, 3 * d))
        self.out_weight = nn.Parameter(torch.empty(e, d, d))  # [E, d, d]
        self.out_bias = nn.Parameter(torch.empty(e, d))
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def project_qkv(self, hidden: torch.Tensor, real: torch.Tensor):
        """Each token's Q, K, V [B, L, d] from its own expert (0 for padding), plus the routing."""
        b, n, d = hidden.shape
        flat = hidden.reshape(b * n, d)
        stats, gate = self.router(flat, real)
        route = dispatch(stats.expert, self.num_experts)  # no host sync
        x = permute_rows(flat, route.order)
        qkv = grouped_linear(x, self.qkv_weight, self.qkv_bias, route)  # [N, 3d], grouped
        q, k, v = unpermute_rows(qkv, route.order).view(b, n, 3 * d).chunk(3, dim=-1)
        return (q, k, v), stats, gate, route

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, real: torch.Tensor
    ) -> tuple[torch.Tensor, RoutingStats]:
        b, n, d = hidden.shape
        (q, k, v), stats, gate, route = self.project_qkv(hidden, real)
        heads = [
            x.view(b, n, self.num_heads, -1).transpose(1, 2) for x in (q, k, v)
        ]  # [B, A, L, a]
        context = nn.functional.scaled_dot_product_attention(
            *heads, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0
        )  # [B, A, L, a]
        context = permute_rows(context.transpose(1, 2).reshape(b * n, d), route.order)
        x = grouped_linear(context, self.out_weight, self.out_bias, route)  # [N, d], grouped
        x = x * permute_rows(gate, route.order)[:, None].to(x.dtype)
        out = unpermute_rows(x, route.order).view(b, n, d)  # padding positions 0
        return self.LayerNorm(hidden + self.dropout(out)), stats


class MiniMoELayer(nn.Module):
    """One encoder layer: attention then FFN, each dense (E = 1) or a mixture (E > 1).

    Dense sublayers keep BertLayer's names (`attention.self.query`, `intermediate`, `output`).
    """

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.moe_attention = config.attention_experts > 1
        self.moe_ffn = config.ffn_experts > 1
        self.attention = MiniMoEAttention(config) if self.moe_attention else BertAttention(config)
        if self.moe_ffn:
            self.ffn = MiniMoEFeedForward(config)
        else:
            self.intermediate = BertIntermediate(config)
            self.output = BertOutput(config)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, real: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, RoutingStats]]:
        routing = {}
        if self.moe_attention:
            hidden, routing["attention"] = self.attention(hidden, mask, real)
        else:
            hidden = self.attention(hidden, mask)[0]
        if self.moe_ffn:
            hidden, routing["ffn"] = self.ffn(hidden, real)
        else:
            hidden = self.output(self.intermediate(hidden), hidden)
        return hidden, routing
