"""Configuration of MiniMoE students: a BERT encoder whose sublayers are mixtures of experts."""

from __future__ import annotations

from transformers import BertConfig, PretrainedConfig

from lmdistill.errors import UserError

MOE_INITS = ("carve", "independent")

# BERT fields a MiniMoE student takes over from the dense student's config (any BERT family)
_BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
)  # fmt: skip


class MiniMoEConfig(BertConfig):
    """BertConfig plus the expert counts (docs/methods.md section 5).

    Each expert has exactly the size of the dense sublayer (attention: `num_attention_heads`
    heads; FFN: `intermediate_size`); a count of 1 means the plain dense BERT sublayer.
    """

    model_type = "lmdistill-minimoe"

    attention_experts: int = 1  # x: attention experts per layer (each owns its Q, K, V, O)
    ffn_experts: int = 4  # y: FFN experts per layer
    router_noise: float = 0.1  # uniform U(-noise, noise) added to router logits in training
    moe_init: str = "carve"  # carve (original work) | independent


def minimoe_config(
    dense: PretrainedConfig,
    attention_experts: int = 1,
    ffn_experts: int = 4,
    router_noise: float = 0.1,
    init: str = "carve",
) -> MiniMoEConfig:
    """A MiniMoE config of the dense student's shape (`dense` may be BERT, RoBERTa, XLM-R)."""
    for name, value in (("attention_experts", attention_experts), ("ffn_experts", ffn_experts)):
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise UserError(f"moe.{name}={value} must be a positive integer; e.g. moe=1x4")
    if init not in MOE_INITS:
        raise UserError(f"unknown moe.init '{init}'; use one of {', '.join(MOE_INITS)}")
    if float(router_noise) < 0:
        raise UserError(f"moe.router_noise={router_noise} must be >= 0; the default is 0.1")
    shape = {k: getattr(dense, k) for k in _BERT_FIELDS if getattr(dense, k, None) is not None}
    return MiniMoEConfig(
        **shape,
        attention_experts=int(attention_experts),
        ffn_experts=int(ffn_experts),
        router_noise=float(router_noise),
        moe_init=str(init),
    )
