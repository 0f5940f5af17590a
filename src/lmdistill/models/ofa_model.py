"""The once-for-all super-net as a Hugging Face model: `OFABertModel` (docs/methods.md section 7).

One set of BERT weights; `set_subnet(l, h)` (or the `subnet(l, h)` context) chooses the
sub-network every later forward pass computes: the first l layers, each on the leading h hidden
dims, h / a heads and I h / d FFN neurons. Layers beyond l are skipped entirely (none of their
LayerNorms is applied, unlike the original code). The full size is a dense `BertModel`: a BERT's
state dict loads key by key (`from_dense`), and `lmdistill.models.ofa_export` carves any
sub-network into a plain `BertModel` with the same outputs.

Q/K/V capture: `forward_qkv(model, l - 1, **batch)` with sub-network (l, h) active returns the
sub-network's last-layer projections [B, L, h] (the hook calls the layer's own `query`, `key`
and `value`, which run at the active width).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lmdistill.models.bert_style import BertStyleEncoder, BertStylePreTrainedModel
from lmdistill.models.ofa_config import OFABertConfig, SubnetShape, ofa_config, subnet_shape
from lmdistill.models.ofa_layers import OFABertEmbeddings, OFABertLayer, OFABertPooler


class OFABertPreTrainedModel(BertStylePreTrainedModel):
    config_class = OFABertConfig
    config: OFABertConfig
    _no_split_modules = ["BertEmbeddings", "OFABertLayer"]


class OFABertModel(BertStyleEncoder, OFABertPreTrainedModel):
    """BERT embeddings + layers + pooler, run as the active sub-network (default: full size)."""

    def __init__(self, config: OFABertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = OFABertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            OFABertLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.pooler = OFABertPooler(config) if add_pooling_layer else None
        self.active = subnet_shape(config, config.num_hidden_layers, config.hidden_size)
        self.post_init()

    @classmethod
    def from_dense(
        cls,
        model: PreTrainedModel,
        ofa_layers: list[int] | None = None,
        ofa_hidden: list[int] | None = None,
    ) -> OFABertModel:
        """A super-net holding a dense BERT's weights (its full size is that BERT)."""
        config = ofa_config(model.config, ofa_layers, ofa_hidden)
        config._attn_implementation = "sdpa"
        supernet = cls(config, add_pooling_layer=getattr(model, "pooler", None) is not None)
        supernet.load_state_dict(model.state_dict())
        return supernet.to(next(model.parameters()).device)

    def set_subnet(self, layers: int, hidden: int) -> SubnetShape:
        """Make sub-network (layers, hidden) the one later forward passes compute."""
        shape = subnet_shape(self.config, layers, hidden)
        self.embeddings.set_width(shape.hidden)
        for layer in self.encoder.layer:
            layer.set_width(shape)
        if self.pooler is not None:
            self.pooler.dense.set_width(shape.hidden, shape.hidden)
        self.active = shape
        return shape

    @contextmanager
    def subnet(self, layers: int, hidden: int) -> Iterator[SubnetShape]:
        """`with model.subnet(l, h):` runs sub-network (l, h), then restores the previous one."""
        previous = self.active
        try:
            yield self.set_subnet(layers, hidden)
        finally:
            self.set_subnet(previous.layers, previous.hidden)

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
        hidden = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)  # [B, L, h]
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask  # [B, 1, 1, L] boolean key mask: SDPA takes it as it is
        else:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )  # [B, 1, L, L] or None (no padding; found with a host read)
        for layer in self.encoder.layer[: self.active.layers]:  # layers beyond l: not applied
            hidden = layer(hidden, mask)
        pooled = self.pooler(hidden) if self.pooler is not None else None  # [B, h]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def ofa_from_config(config: BertConfig, **family) -> OFABertModel:
    """A randomly initialised (BERT init) super-net of a dense BERT config's shape."""
    return OFABertModel._from_config(ofa_config(config, **family), attn_implementation="sdpa")


def register() -> None:
    """Register the super-net with `AutoConfig` / `AutoModel` (model type "lmdistill-ofa")."""
    try:
        AutoConfig.register(OFABertConfig.model_type, OFABertConfig)
    except ValueError:  # already registered
        return
    AutoModel.register(OFABertConfig, OFABertModel)


register()
