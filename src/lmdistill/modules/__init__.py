"""Distillation methods: one LightningModule per method, on one shared base."""

from lmdistill.modules.base import DistillationMethod
from lmdistill.modules.minilm import MiniLMv1, MiniLMv2
from lmdistill.modules.minimoe import MiniMoE
from lmdistill.modules.optim import OptimSettings

__all__ = ["DistillationMethod", "MiniLMv1", "MiniLMv2", "MiniMoE", "OptimSettings"]
