"""What lmdistill's own encoders (MiniMoE, sparse, once-for-all) share with BERT: the weight init
of the embeddings' buffers, the input-embedding accessors and the embedding step of `forward`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertEmbeddings
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings


class BertStylePreTrainedModel(PreTrainedModel):
    """Base of the encoders and their heads: BERT init (normal Linear/Embedding weights, zero
    biases, unit LayerNorms) and the position and token-type buffers of BERT's (or RoBERTa's)
    embeddings. Name `config_class` and `_no_split_modules`."""

    base_model_prefix = "bert"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (BertEmbeddings, RobertaEmbeddings)):
            init.copy_(
                module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1))
            )
            init.zeros_(module.token_type_ids)


class BertStyleEncoder:
    """Mixin of the encoders themselves (before their `BertStylePreTrainedModel` base), which
    hold BERT's embeddings (or a subclass) as `self.embeddings`."""

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def embed(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The embeddings' output [B, L, d] of exactly one of input_ids [B, L] and inputs_embeds
        [B, L, d]."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        return self.embeddings(
            input_ids=input_ids,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
        )
