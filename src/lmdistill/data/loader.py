"""A StatefulDataLoader whose state is the position of the last *trained* batch.

Lightning saves `loader.state_dict()` into checkpoints, but it fetches one batch ahead, so the
plain StatefulDataLoader state is one batch past what was trained: every resume would skip a
batch. `ResumableDataLoader` snapshots the state right after each batch it yields;
`mark_batch_consumed()` (called by `DataPositionCallback` when a batch starts training) advances
the "consumed" state to the snapshot of that batch, and `state_dict()` returns it.

The loader also counts epochs: when an iteration has run to the end, the next `__iter__` starts
epoch + 1 (the dataset seeds its RNG from it); the epoch travels in the state. A state saved
after the last batch of an epoch loads as that end: the next `__iter__` starts the next epoch,
as the uninterrupted loader does (not an empty iteration first, which on one DDP rank alone
would put the ranks out of step).

Creating an iterator draws its worker base seed from the loader's own generator, never from
the global RNG that dropout uses: otherwise the iterator of a new epoch would shift the dropout
masks of an uninterrupted run against a run resumed at that epoch boundary.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lmdistill import worker_lifetime
from lmdistill.distributed import gather_from_ranks

_EPOCH_KEY = "lmdistill_epoch"
_POSITIONS_KEY = "lmdistill_data_positions"


class ResumableDataLoader(StatefulDataLoader):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("generator", torch.Generator())  # not the global RNG (docstring)
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
        self.worker_init_fn = worker_lifetime.die_with_parent(self.worker_init_fn)  # no orphans
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
        self._snapshots.clear()
        self._consumed = None
        self._exhausted = _iteration_finished(state)
        if not self._exhausted:  # else the next __iter__ starts the next epoch afresh
            super().load_state_dict(state)


def _iteration_finished(state: dict[str, Any]) -> bool:
    """Whether a loader state was saved after the last batch of its iteration: the stream of
    the main process, or of every worker, is done."""
    snapshot = state.get("_snapshot")  # with worker processes
    workers = (snapshot or {}).get("_worker_snapshots", {}).values()
    streams = (
        [w.get("dataset_state") for w in workers] if snapshot else [state.get("dataset_state")]
    )
    return bool(streams) and all(isinstance(s, dict) and s.get("done") for s in streams)


class DataPositionCallback(L.Callback):
    """Resume every rank's data stream exactly where it stopped.

    Tells the train loader which batch is being trained (see `ResumableDataLoader`). Lightning
    checkpoints only rank 0's loader state, so the states of all ranks are gathered into the
    checkpoint and each rank gets its own back on resume.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_batch_consumed"):
            loader.mark_batch_consumed()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_batch_consumed"):
            checkpoint[_POSITIONS_KEY] = gather_from_ranks(loader.state_dict())  # [rank]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        positions = checkpoint.get(_POSITIONS_KEY)
        loop_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if positions and "combined_loader" in loop_state:  # read by the fit loop, after this hook
            loop_state["combined_loader"] = [positions[trainer.global_rank]]
