"""One LightningModule per distillation method, on one shared base."""

from lmdistill.modules.base import DistillationModule, OptimSettings
from lmdistill.modules.minilm import MiniLMv1, MiniLMv2
from lmdistill.modules.minimoe import MiniMoE

__all__ = ["DistillationModule", "MiniLMv1", "MiniLMv2", "MiniMoE", "OptimSettings"]
