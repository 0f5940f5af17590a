"""Structured sparsification (docs/methods.md section 6): masks, importance, schedule, reordering,
slicing. The entry point is `lmdistill.sparsify`; sparse students are `lmdistill.models.sparse`."""

from lmdistill.sparse.importance import ImportanceSums, accumulate, importance_order, normalize
from lmdistill.sparse.masking import Masks, apply_masks
from lmdistill.sparse.reorder import reorder_model
from lmdistill.sparse.schedule import SUPPORTED, SparsityPlan, plan_sparsity, prune_percent
from lmdistill.sparse.slicing import slice_model, sparse_config

__all__ = [
    "SUPPORTED",
    "ImportanceSums",
    "Masks",
    "SparsityPlan",
    "accumulate",
    "apply_masks",
    "importance_order",
    "normalize",
    "plan_sparsity",
    "prune_percent",
    "reorder_model",
    "slice_model",
    "sparse_config",
]
