"""MiniMoE students (docs/methods.md section 5): public names and Auto* registration.

`import lmdistill` registers the `lmdistill-minimoe` model type with `AutoConfig`, `AutoModel`
and `AutoModelForSequenceClassification`, so exported students load without
`trust_remote_code`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from lmdistill.models.moe_config import MOE_INITS, MiniMoEConfig, minimoe_config
from lmdistill.models.moe_model import (
    MiniMoEForSequenceClassification,
    MiniMoEModel,
    MoERouting,
    minimoe_gflops,
)
from lmdistill.models.moe_routing import (
    RoutingStats,
    carve_indices,
    expert_load,
    load_balance,
    router_entropy,
)

__all__ = [
    "MOE_INITS",
    "MiniMoEConfig",
    "MiniMoEForSequenceClassification",
    "MiniMoEModel",
    "MoERouting",
    "RoutingStats",
    "carve_indices",
    "expert_load",
    "load_balance",
    "minimoe_config",
    "minimoe_gflops",
    "register",
    "router_entropy",
]


def register() -> None:
    """Register the MiniMoE classes with the transformers Auto* factories (idempotent)."""
    model_type = MiniMoEConfig.model_type
    try:
        AutoConfig.register(model_type, MiniMoEConfig)
    except ValueError:  # already registered
        return
    AutoModel.register(MiniMoEConfig, MiniMoEModel)
    AutoModelForSequenceClassification.register(MiniMoEConfig, MiniMoEForSequenceClassification)


register()
