"""Sparse students (docs/methods.md section 6): public names and Auto* registration.

`import lmdistill` registers the `lmdistill-sparse` model type with `AutoConfig`, `AutoModel`,
`AutoModelForSequenceClassification` and `AutoModelForMaskedLM`, so sliced students load without
`trust_remote_code`.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from lmdistill.models.sparse_config import SparseBertConfig
from lmdistill.models.sparse_model import (
    SparseBertForMaskedLM,
    SparseBertForSequenceClassification,
    SparseBertModel,
    sparse_gflops,
    sparse_params,
)

__all__ = [
    "SparseBertConfig",
    "SparseBertForMaskedLM",
    "SparseBertForSequenceClassification",
    "SparseBertModel",
    "register",
    "sparse_gflops",
    "sparse_params",
]


def register() -> None:
    """Register the sparse classes with the transformers Auto* factories (idempotent)."""
    try:
        AutoConfig.register(SparseBertConfig.model_type, SparseBertConfig)
    except ValueError:  # already registered
        return
    AutoModel.register(SparseBertConfig, SparseBertModel)
    AutoModelForSequenceClassification.register(
        SparseBertConfig, SparseBertForSequenceClassification
    )
    AutoModelForMaskedLM.register(SparseBertConfig, SparseBertForMaskedLM)


register()
