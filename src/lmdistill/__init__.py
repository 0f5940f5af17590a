"""lmdistill: task-agnostic distillation of BERT-family encoders."""

__version__ = "0.1.0"
