"""MiniMoE students as Hugging Face models: `MiniMoEModel`, `MiniMoEForSequenceClassification`.

After a forward pass, `model.routing` lists the routing of every MoE sublayer of that pass as
`MoERouting(layer, kind, stats)` (padding marked in `stats.real`), also of a pass that Q/K/V
capture stops at a layer's attention experts (`record_routing`): the distillation module reads
it for the load-balance loss and for logging; it is not part of the model's outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
)
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler

from lmdistill.models.bert_style import BertStyleEncoder, BertStylePreTrainedModel
from lmdistill.models.classification import EncoderForSequenceClassification
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.moe_config import MiniMoEConfig
from lmdistill.models.moe_layers import MiniMoEAttention, MiniMoEFeedForward, MiniMoELayer
from lmdistill.models.moe_routing import RoutingStats, carve_indices


class MoERouting(NamedTuple):
    layer: int  # 0-based encoder layer
    kind: str  # "attention" | "ffn"
    stats: RoutingStats


class MiniMoEPreTrainedModel(BertStylePreTrainedModel):
    config_class = MiniMoEConfig
    config: MiniMoEConfig
    _no_split_modules = ["BertEmbeddings", "MiniMoELayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """BERT init; experts carved from one widened sublayer or drawn independently."""
        super()._init_weights(module)
        if isinstance(module, MiniMoEFeedForward):
            pairs = ((module.in_weight, module.in_bias, 1), (module.out_weight, None, 0))
            self._init_experts(pairs, module.out_bias, elements=module.in_weight.shape[-1], width=1)
        elif isinstance(module, MiniMoEAttention):
            d = module.out_weight.shape[-1]
            a = d // module.num_heads
            pairs = [
                (w, b, 1)
                for w, b in zip(
                    module.qkv_weight.chunk(3, -1), module.qkv_bias.chunk(3, -1), strict=True
                )
            ]
            pairs.append((module.out_weight, None, 0))
            self._init_experts(pairs, module.out_bias, elements=module.num_heads, width=a)

    def _init_experts(self, pairs, out_bias, elements: int, width: int) -> None:
        """Fill stacked expert weights [E, in, out] of one sublayer.

        pairs: (weight view, bias view or None, axis) with axis the carved axis of one expert's
        [in, out] matrix; `elements` units of `width` columns/rows each (FFN neurons: width 1;
        attention heads: width a). carve: one widened BERT-init matrix with E*elements units, and
        expert e takes the units `carve_indices(elements, E)[e]` (docs/methods.md section 5).
        """
        std = self.config.initializer_range
        num_experts = out_bias.shape[0]
        units = torch.tensor(carve_indices(elements, num_experts))  # [E, n]
        cols = (units[..., None] * width + torch.arange(width)).flatten(1)  # [E, n * width]
        for weight, bias, axis in pairs:
            carved = torch.empty_like(weight)  # [E, in, out]
            if self.config.moe_init == "carve":
                shape = list(weight.shape[1:])
                shape[axis] *= num_experts
                wide = torch.empty(shape, dtype=weight.dtype, device=weight.device).normal_(
                    0.0, std
                )
                for e in range(num_experts):
                    carved[e] = wide.index_select(axis, cols[e].to(weight.device))
            else:
                carved.normal_(0.0, std)
            init.copy_(weight, carved)
            if bias is not None:
                init.zeros_(bias)  # a widened zero bias carves into zeros
        init.zeros_(out_bias)  # output-side bias: one vector, copied into every expert


class MiniMoEModel(BertStyleEncoder, MiniMoEPreTrainedModel):
    """BERT embeddings + MiniMoE layers (+ pooler). 1x1 is a dense BertModel."""

    def __init__(self, config: MiniMoEConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            [MiniMoELayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.routing: list[MoERouting] = []
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
        hidden = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)  # [B, L, d]
        b, n = hidden.shape[:2]
        if attention_mask is None:
            real = torch.ones(b * n, dtype=torch.bool, device=hidden.device)
            mask = None
        elif attention_mask.dim() == 4:  # [B, 1, 1, L] boolean key mask: SDPA takes it as it is
            real = attention_mask[:, 0, 0, :].reshape(-1)  # [B*L]
            mask = attention_mask
        else:
            real = attention_mask.reshape(-1).bool()  # [B*L]
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )  # [B, 1, L, L] or None (no padding; found with a host read)
        self.routing = []
        for i, layer in enumerate(self.encoder.layer):
            hidden, routing = layer(hidden, mask, real)
            for kind, stats in routing.items():
                self.record_routing(i, kind, stats)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)

    def record_routing(self, layer: int, kind: str, stats: RoutingStats) -> None:
        """Add the routing of one MoE sublayer (0-based `layer`) to this pass's `routing`."""
        self.routing.append(MoERouting(layer, kind, stats))


class MiniMoEForSequenceClassification(EncoderForSequenceClassification, MiniMoEPreTrainedModel):
    """MiniMoEModel + dropout + linear classifier on the pooled output (as BERT)."""

    encoder_class = MiniMoEModel


def minimoe_gflops(config: MiniMoEConfig, seq_len: int = 128) -> float:
    """Inference GFLOPs of one sequence: one expert per sublayer per token, plus the routers.

    The dense encoder's count (`encoder_gflops`) plus 2 d E FLOPs per token for every MoE
    sublayer's router (E = 1 sublayers have no router).
    """
    dense = encoder_gflops(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, seq_len
    )
    experts = [e for e in (config.attention_experts, config.ffn_experts) if e > 1]
    routers = 2.0 * seq_len * config.hidden_size * sum(experts) * config.num_hidden_layers
    return dense + routers / 1e9
