"""Test-only Lightning callbacks that disturb a run's environment (`+callbacks.<n>._target_=
resume_probes.<Class>`): a disk that fills up, DataLoader workers too busy to notice their
parent's death."""

from __future__ import annotations

import lightning as L
import torch


class DiskFullFromStep(L.Callback):
    """From `step` optimizer steps on, every `torch.save` writes into /dev/full, whose writes fail
    with ENOSPC exactly as on a full disk (torch then raises its `unexpected pos` RuntimeError)."""

    def __init__(self, step: int):
        self.step = step
        self._real_save = None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step < self.step or self._real_save is not None:
            return
        real_save = self._real_save = torch.save

        def save(obj, f, *a, **k):
            with open("/dev/full", "wb") as full:
                return real_save(obj, full, *a, **k)

        torch.save = save


class BusyWorkers(L.Callback):
    """A DataLoader worker notices a dead parent only while it waits for work, every
    `MP_STATUS_CHECK_INTERVAL` (5 s) seconds; here once an hour, as for a worker busy reading or
    tokenizing a large document when its parent is killed. Set before the workers are forked."""

    def __init__(self, interval: float = 3600.0):
        import torch.utils.data._utils.worker as torch_worker
        import torchdata.stateful_dataloader.worker as torchdata_worker

        torch_worker.MP_STATUS_CHECK_INTERVAL = interval
        torchdata_worker.MP_STATUS_CHECK_INTERVAL = interval
