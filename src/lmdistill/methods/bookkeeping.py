"""The bookkeeping every method shares, kept out of the methods: losses and tokens (`meter`),
non-finite steps and clipping (`grad_guard`), and RNG states for exact resume.

`StepRecords` holds this state for one LightningModule; the module's hooks call it. Nothing
here reads a tensor on the host except `flush`, once per logging interval.
"""

from __future__ import annotations

import random

import torch

from lmdistill.distributed import gather_from_ranks
from lmdistill.errors import UserError
from lmdistill.methods.grad_guard import clip_and_guard
from lmdistill.methods.meter import TrainingMeter


class NonFiniteLossError(UserError):
    """Too many consecutive steps had a non-finite loss; the run stops with a checkpoint."""


class StepRecords:
    """A method's running records: this step's micro-batches, the meter, RNG to restore."""

    def __init__(self, max_nonfinite_steps: int):
        self.meter = TrainingMeter()
        self.max_nonfinite_steps = max_nonfinite_steps
        self.micro_batches = 0  # of the current optimizer step
        self._step_loss: torch.Tensor | None = None  # sum of this step's micro-batch losses
        self._step_nonfinite: torch.Tensor | None = None  # [] bool: a loss was not finite
        self._last_terms: dict = {}
        self.rng_to_restore: dict | None = None

    def add_micro_batch(self, loss: torch.Tensor, terms: dict, trainer) -> None:
        """Remember this micro-batch's loss and whether it (on any rank) is not finite."""
        nonfinite = ~torch.isfinite(loss.detach())
        if trainer is not None and trainer.world_size > 1:  # an all-reduce, but no host read
            nonfinite = trainer.strategy.reduce(nonfinite.float(), reduce_op="sum") > 0
        first = self.micro_batches == 0
        self._step_loss = loss.detach() if first else self._step_loss + loss.detach()
        self._step_nonfinite = nonfinite if first else self._step_nonfinite | nonfinite
        self.micro_batches += 1
        self._last_terms = {name: value.detach() for name, value in terms.items()}

    def end_step(self, optimizer, max_norm: float | None, scaler) -> None:
        """Clip, skip a non-finite update on the device, and count the step."""
        skipped = clip_and_guard(optimizer, max_norm, self._step_nonfinite, scaler)
        loss = self._step_loss if self.micro_batches == 1 else self._step_loss / self.micro_batches
        self.meter.add_step(loss, skipped, self._last_terms)
        self.micro_batches = 0

    def flush(self, trainer, batch_size: int | None = None) -> dict:
        """Reduce and read the interval's figures (the one host read); stop on diverging losses."""
        world = trainer.world_size if trainer is not None else 1
        interval = self.meter.flush(_sum_over_ranks(trainer))
        metrics = {"train/tokens_seen": float(self.meter.tokens_seen)}
        if interval.get("loss") is not None:
            metrics["train/loss"] = interval["loss"]
            metrics.update({f"train/loss_{k}": v for k, v in interval["terms"].items()})
        if interval.get("tokens_per_second") is not None:
            metrics["train/tokens_per_second"] = interval["tokens_per_second"]
        if batch_size is not None:
            sequences = batch_size * world * trainer.accumulate_grad_batches
            metrics["train/global_batch_size"] = float(sequences)
        if self.meter.nonfinite_steps:
            metrics["train/nonfinite_steps"] = float(self.meter.nonfinite_steps)
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer else None
        if scaler is not None and scaler.is_enabled():
            metrics["train/loss_scale"] = scaler.get_scale()  # ready: the read above waited
        limit = self.max_nonfinite_steps
        if interval.get("worst_run", 0) >= limit:
            raise NonFiniteLossError(
                f"the loss was not finite for {limit} steps in a row (up to step "
                f"{trainer.global_step}); the last finite state is in checkpoints/last.ckpt: "
                "lower optim.lr, use trainer.precision=bf16-mixed or 32, or check the data, then "
                "resume with ckpt_path=<that file> resume.allow=[<the changed settings>]"
            )
        if trainer is not None:
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        return metrics

    def state_dict(self, trainer, logged: bool = False) -> dict:
        """Exact counts and every rank's RNG states (collectives: every rank calls this).
        `logged`: the steps since the last flush are logged right after this checkpoint."""
        return {
            **self.meter.state_dict(_sum_over_ranks(trainer), logged=logged),
            "world_size": trainer.world_size if trainer is not None else 1,
            "rng": gather_from_ranks(rng_states()),  # [rank]: every rank's dropout resumes exactly
        }

    def load_state_dict(self, state: dict, rank: int) -> None:
        self.meter.load_state_dict(state)
        # Restored at the first batch: creating the resumed DataLoader iterator draws from the RNG.
        rng = state.get("rng")
        if isinstance(rng, dict):  # checkpoints of earlier lmdistill versions: rank 0's only
            rng = [rng]
        self.rng_to_restore = rng[rank] if rng else None

    def restore_rng(self) -> None:
        """At the first batch after a resume (after the resumed loader drew its own seeds)."""
        if self.rng_to_restore is not None:
            set_rng_states(self.rng_to_restore)
            self.rng_to_restore = None


def _sum_over_ranks(trainer):
    """`reduce(tensor) -> tensor summed over DDP ranks`, or None on one process."""
    if trainer is None or trainer.world_size == 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")


def rng_states() -> dict:
    """torch (CPU, CUDA) and Python RNG states; plain tensors and ints, so `weights_only` loads them."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
