"""Test-only Lightning callbacks, added to CLI runs with `+callbacks.<name>._target_=probes.<Class>`.

They observe or disturb a run from inside every rank: what each rank trained on, a signal at a
given step, a non-finite loss at given steps.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch


class RecordBatches(L.Callback):
    """Append one JSON line per trained batch to `<path>/batches_rank<r>.jsonl`: step, loss and
    the real (unpadded) token ids of every sequence. Written as it goes, so a killed run keeps
    the lines of the batches it trained."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._ids: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        self._ids = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths, strict=True)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # {}: step skipped
        line = {"step": trainer.global_step - 1, "rank": trainer.global_rank,
                "loss": None if loss is None else float(loss), "ids": self._ids}  # fmt: skip
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"batches_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class SignalAtStep(L.Callback):
    """Send `signal` to this process once `step` optimizer steps are done (rank 0 only)."""

    def __init__(self, step: int, signal: str = "SIGKILL"):
        self.step = step
        self.signal = signal

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), getattr(signal, self.signal))


class MarkerHandler(L.Callback):
    """Install a Python handler for `signal` before training (as submitit does for SIGUSR2); the
    handler writes `path`. Checks that lmdistill runs an earlier handler after its checkpoint."""

    def __init__(self, path: str, signal: str = "SIGUSR2"):
        self.path = path
        self.signal = signal

    def setup(self, trainer, pl_module, stage: str) -> None:
        def handler(signum, frame):
            Path(self.path).write_text(f"{signal.Signals(signum).name} at {trainer.global_step}\n")

        signal.signal(getattr(signal, self.signal), handler)


class NanLossAtSteps(L.Callback):
    """Make the loss NaN at the given global steps (every step from `from_step` on, if given)."""

    def __init__(self, steps: list[int] | None = None, from_step: int | None = None):
        self.steps = set(steps or [])
        self.from_step = from_step

    def on_fit_start(self, trainer, pl_module) -> None:
        combine = pl_module.combine

        def poisoned(terms):
            loss = combine(terms)
            step = trainer.global_step
            if step in self.steps or (self.from_step is not None and step >= self.from_step):
                return loss * torch.tensor(float("nan"))
            return loss

        pl_module.combine = poisoned
