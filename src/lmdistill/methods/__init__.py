"""Distillation methods: one LightningModule per method, on one shared base."""

from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.minilm import MiniLMv1, MiniLMv2
from lmdistill.methods.minimoe import MiniMoE
from lmdistill.methods.optim import OptimSettings

__all__ = ["DistillationMethod", "MiniLMv1", "MiniLMv2", "MiniMoE", "OptimSettings"]
