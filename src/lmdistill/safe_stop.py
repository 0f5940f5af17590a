"""Stop cleanly on a signal or a diverging loss: finish the step, write last.ckpt, exit.

Lightning turns SIGTERM into `SIGTERMException` at the next batch boundary (every DDP rank
together). `CheckpointOnStop` makes the pre-emption signals of schedulers (SLURM's `--signal`,
submitit's SIGUSR2) do the same, and writes `checkpoints/last.ckpt` when training stops that way
or with `NonFiniteLossError`, so `ckpt_path=last` (or a requeued job) continues from there.
A handler that was installed before (submitit's requeue) runs after the checkpoint is written.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmdistill.methods.bookkeeping import NonFiniteLossError

log = logging.getLogger("lmdistill")
EXIT_SIGNALLED = 128 + signal.SIGTERM  # the conventional exit code of a job stopped by SIGTERM


class CheckpointOnStop(L.Callback):
    """See the module docstring. `signals`: extra signal names treated like SIGTERM."""

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGUSR2",)):
        self.signals = [signal.Signals[name] for name in signals]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        for signum in self.signals:  # after Lightning installed its SIGTERM handler
            self._previous[signum] = signal.signal(signum, self._forward_as_sigterm)

    def _forward_as_sigterm(self, signum, frame) -> None:
        self.received = signal.Signals(signum)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop at the next batch boundary

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, NonFiniteLossError)):
            return  # mid-step failures: the state may be half-updated, keep the last checkpoint
        path = last_checkpoint_path(trainer)
        # the full state; left unset, Lightning logs "`weights_only` was not set, defaulting to `False`"
        trainer.save_checkpoint(path, weights_only=False)
        if isinstance(exception, SIGTERMException):
            name = (self.received or signal.SIGTERM).name
            log.warning("%s at step %d: wrote %s", name, trainer.global_step, path)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def run_previous_handler(self) -> None:
        """After the checkpoint: let a scheduler's own handler (submitit: requeue) run."""
        handler = self._previous.get(self.received) if self.received else None
        if callable(handler):
            handler(self.received, None)


def last_checkpoint_path(trainer) -> Path:
    """`<checkpoint dir>/last.ckpt` of the run's ModelCheckpoint (or the default root dir's)."""
    callback = trainer.checkpoint_callback
    directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(directory) / "last.ckpt"
