"""Experiment-tracking helpers shared by the entry points."""

from __future__ import annotations

import sys
from pathlib import Path


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


def _logs_to_wandb(conf) -> bool:
    """Whether a logger config (one entry of the `logger` group) is a W&B logger."""
    from hydra.utils import get_class
    from lightning.pytorch.loggers import WandbLogger

    return issubclass(get_class(conf._target_), WandbLogger)


def make_loggers(logger_cfg, wandb_run_id: str | None = None) -> list:
    """The loggers of the `logger` group; a W&B logger continues the W&B run `wandb_run_id`
    (that of the checkpoint a run resumes: `checkpoint_wandb_run_id`), if one is given."""
    from hydra.utils import instantiate

    resume = {"id": wandb_run_id} if wandb_run_id else {}  # WandbLogger: resume="allow"
    return [
        instantiate(conf, **(resume if _logs_to_wandb(conf) else {}))
        for conf in (logger_cfg or {}).values()
    ]


def wandb_run_id(loggers) -> str | None:
    """The id of the W&B run the `loggers` log to, if one of them is a W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    ids = [logger.version for logger in loggers if isinstance(logger, WandbLogger)]
    return ids[0] if ids else None


def open_job_wandb_run(logger_cfg, run_dir: Path):
    """Where the job logs to W&B (`logger_cfg`: the config's `logger` group) but no W&B run is
    open (a finished run re-run for `eval=glue`: nothing was trained): open the configured one,
    resuming the run directory's latest W&B run (its id, `<run_dir>/wandb/latest-run`), if any.
    Returns the job's W&B run (None: it logs to none)."""
    if _active_wandb_run() is not None or not logger_cfg:
        return _active_wandb_run()
    wandb_cfg = {name: conf for name, conf in logger_cfg.items() if _logs_to_wandb(conf)}
    if not wandb_cfg:
        return None
    latest = Path(run_dir) / "wandb" / "latest-run"
    run_id = latest.resolve().name.rsplit("-", 1)[-1] if latest.is_dir() else None
    logger, *_ = make_loggers(wandb_cfg, run_id)
    return logger.experiment  # wandb.init: the job's run from now
