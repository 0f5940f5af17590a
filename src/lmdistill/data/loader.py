"""A StatefulDataLoader whose state is the position of the last *trained* batch.

Lightning saves `loader.state_dict()` into checkpoints, but it fetches one batch ahead, so the
plain StatefulDataLoader state is one batch past what was trained: every resume would skip a
batch. `ResumableDataLoader` snapshots the state right after each batch it yields;
`mark_batch_consumed()` (called by `DataPositionCallback` when a batch starts training) advances
the "consumed" state to the snapshot of that batch, and `state_dict()` returns it.

The loader also counts epochs: when an iteration has run to the end, the next `__iter__` starts
epoch + 1 (the dataset seeds its RNG from it); the epoch travels in the state.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning as L
from torchdata.stateful_dataloader import StatefulDataLoader

_EPOCH_KEY = "lmdistill_epoch"


class ResumableDataLoader(StatefulDataLoader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch = int(getattr(self.dataset, "epoch", 0))
        self._exhausted = False
        self._snapshots: deque = deque()
        self._consumed: dict | None = None

    def __iter__(self):
        if self._exhausted and hasattr(self.dataset, "set_epoch"):
            self._epoch += 1
            self.dataset.set_epoch(self._epoch)
        self._exhausted = False
        self._snapshots.clear()
        self._consumed = None
        iterator = super().__iter__()
        self._consumed = super().state_dict()  # nothing trained yet in this iteration
        return self._generate(iterator)

    def _generate(self, iterator):
        for batch in iterator:
            self._snapshots.append(super().state_dict())
            yield batch
        self._exhausted = True

    def mark_batch_consumed(self) -> None:
        """The oldest batch yielded and not yet marked has started training."""
        if self._snapshots:
            self._consumed = self._snapshots.popleft()

    def state_dict(self) -> dict[str, Any]:
        state = self._consumed if self._consumed is not None else super().state_dict()
        return {**state, _EPOCH_KEY: self._epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        epoch = state.pop(_EPOCH_KEY, None)
        if epoch is not None:
            self._epoch = int(epoch)
            if hasattr(self.dataset, "epoch"):
                self.dataset.epoch = self._epoch
        self._exhausted = False
        self._snapshots.clear()
        self._consumed = None
        super().load_state_dict(state)


class DataPositionCallback(L.Callback):
    """Tells the train loader which batch is being trained, so checkpoints resume exactly."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_batch_consumed"):
            loader.mark_batch_consumed()
