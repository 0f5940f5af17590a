"""Experiment-tracking helpers shared by the entry points."""

from __future__ import annotations


def finish_wandb(trainer) -> None:
    """Close W&B runs so the next job of a multirun gets its own run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()
