"""Experiment-tracking helpers shared by the entry points."""

from __future__ import annotations

import sys


def finish_wandb(trainer) -> None:
    """Close W&B runs so the next job of a multirun gets its own run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()


def _active_wandb_run():
    """The W&B run this process logs to, or None (wandb is not even imported without one)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def finish_job_wandb_run() -> None:
    """At the end of a job: close its W&B run, if it has one (the next job gets its own)."""
    if _active_wandb_run() is not None:
        sys.modules["wandb"].finish()


def update_wandb_summary(values: dict) -> None:
    """Add `values` to the summary of the job's W&B run, if it has one."""
    run = _active_wandb_run()
    if run is not None:
        run.summary.update(values)
