"""Count the reads of tensor values on the host during training steps (each one, on a GPU, makes
the host wait for the device): `item`, `tolist`, `bool`, `int`, `float`, `cpu`, `numpy`.

    counter = HostReadCounter()            # a Lightning callback
    trainer = L.Trainer(callbacks=[counter], ...)
    trainer.fit(...)
    counter.per_step                       # reads in each training step, in order

A step is counted from `on_train_batch_start` to the end of the LightningModule's
`on_train_batch_end` (forward, backward, optimizer, logging and the hooks of the step); the batch
is read on the host before it is transferred, which costs a GPU nothing and is not counted.
Works on CPU, where it finds the same reads.
"""

from __future__ import annotations

import traceback
from collections import Counter

import lightning as L
import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class HostReadCounter(L.Callback):
    """See the module docstring. `where=True` also records the caller of each read."""

    def __init__(self, where: bool = False):
        self.per_step: list[int] = []
        self.callers: Counter = Counter()
        self._where = where
        self._originals: dict = {}
        self._count = 0

    def _patch(self) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                self._count += 1
                if self._where:
                    frame = traceback.extract_stack(limit=3)[0]
                    self.callers[f"{_name} {frame.filename}:{frame.lineno}"] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def _unpatch(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._count = 0
        self._patch()

    def setup(self, trainer, pl_module, stage: str) -> None:
        hook = pl_module.on_train_batch_end  # runs after the callbacks' own batch-end hooks

        def counted_hook(*args, **kwargs):
            try:
                return hook(*args, **kwargs)
            finally:
                self._unpatch()
                self.per_step.append(self._count)

        pl_module.on_train_batch_end = counted_hook

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._unpatch()
