"""One LightningModule per distillation method, on one shared base."""

from lmdistill.modules.base import DistillationModule, OptimSettings
from lmdistill.modules.minilm import MiniLMv1, MiniLMv2

__all__ = ["DistillationModule", "MiniLMv1", "MiniLMv2", "OptimSettings"]
