"""Training bookkeeping that never stops the device: counters live on it, read once per interval.

A GPU runs ahead of the host as long as nothing reads a tensor's value. Everything a step records
(loss sums, skipped steps, the longest run of non-finite steps) is accumulated in device tensors;
the real-token count of each batch is a host int, known before the batch is transferred.
`flush()` reduces over DDP ranks with one all-reduce and reads everything with one `.tolist()`:
the only host synchronisation, once per logging interval.
"""

from __future__ import annotations

import time
from collections import deque

import torch

# Positions in the vector that `flush()` all-reduces and reads; the loss terms' sums follow.
_TOKENS, _LOSS_SUM, _LOSS_COUNT, _NONFINITE, _WORST_RUN = range(5)
_FIXED = 5


class TrainingMeter:
    """Tokens, losses and non-finite steps of a run, exact across ranks and resumes."""

    def __init__(self):
        self.tokens_seen = 0  # real tokens of all ranks, up to the last flush
        self.nonfinite_steps = 0  # skipped steps (non-finite loss or gradient), whole run
        self.loss_first: float | None = None
        self.run_tokens = 0  # timed tokens and seconds of this process (start-up excluded)
        self.run_seconds = 0.0
        self._recent: deque[torch.Tensor] = deque(maxlen=10)  # last losses, detached (no sync)
        self._first: torch.Tensor | None = None
        self._pending_tokens = 0  # this rank's real tokens since the last flush (host int)
        self._acc: torch.Tensor | None = None  # [5 + terms] float64 on the device
        self._terms: list[str] = []  # names of the loss terms, in their order in `_acc`
        self._run = None  # [] current run of consecutive non-finite steps (device)
        self._clock = time.perf_counter()  # reset by `start()`
        self._flushes = 0  # of this process: the first interval includes start-up
        self._steps_since_flush = 0

    def start(self) -> None:
        """Start the clock (at the start of training)."""
        self._clock = time.perf_counter()

    # --- every step (no host synchronisation) --------------------------------------------------

    def add_batch_tokens(self, tokens: int) -> None:
        """This rank's real tokens of the next batch (a host int, counted before transfer)."""
        self._pending_tokens += tokens

    def add_step(self, loss: torch.Tensor, skipped: torch.Tensor, terms: dict) -> None:
        """One optimizer step: its loss, whether the update was skipped ([] bool), and the named
        loss terms ([] tensors) of its last micro-batch."""
        loss = loss.detach().to(torch.float64)
        if self._acc is None or list(terms) != self._terms:
            self._terms = list(terms)
            self._acc = torch.zeros(_FIXED + len(terms), dtype=torch.float64, device=loss.device)
            self._run = torch.zeros((), dtype=torch.float64, device=loss.device)
        if self._first is None and self.loss_first is None:
            self._first = loss
        kept = ~skipped
        sums = torch.stack([loss, *(v.detach().to(torch.float64) for v in terms.values())])
        sums = torch.where(kept, sums, 0.0)  # [1 + terms]
        self._acc[_LOSS_SUM] += sums[0]
        self._acc[_FIXED:] += sums[1:]
        self._acc[_LOSS_COUNT] += kept
        self._acc[_NONFINITE] += skipped
        self._run = torch.where(skipped, self._run + 1, 0.0)
        torch.maximum(self._acc[_WORST_RUN], self._run, out=self._acc[_WORST_RUN])
        self._recent.append(torch.where(kept, loss, float("nan")))
        self._steps_since_flush += 1

    # --- once per interval (one all-reduce, one host read) ------------------------------------

    def flush(self, reduce=None) -> dict:
        """Reduce over ranks (`reduce(tensor) -> summed tensor`, or None), read, reset.

        Returns the interval's figures: tokens (all ranks), mean loss and mean terms (None if
        every step was skipped), skipped steps, the longest run of consecutive skipped steps, tokens per second.
        """
        if self._acc is None:
            return {}
        acc = self._acc.clone()
        acc[_TOKENS] = self._pending_tokens
        if reduce is not None:
            worst = acc[_WORST_RUN].clone()  # equal on every rank: the gradients are all-reduced
            acc = reduce(acc)
            acc[_WORST_RUN] = worst
        values = acc.tolist()  # the one host read
        tokens, loss_sum, loss_count, nonfinite, worst_run = values[:_FIXED]
        if self._first is not None:
            self.loss_first = float(self._first)  # ready since the read above: no extra wait
            self._first = None
        now = time.perf_counter()
        seconds = now - self._clock
        if self._flushes:  # the first interval of a process includes start-up: not timed
            self.run_tokens += int(tokens)
            self.run_seconds += seconds
        self._clock = now
        self._flushes += 1
        self.tokens_seen += int(tokens)
        self.nonfinite_steps += int(nonfinite)
        self._pending_tokens = 0
        self._acc.zero_()
        self._acc[_WORST_RUN] = self._run  # a run of skipped steps may go on into the next interval
        self._steps_since_flush = 0
        mean = (lambda total: total / loss_count) if loss_count else (lambda total: None)
        return {
            "tokens": int(tokens),
            "loss": mean(loss_sum),
            "terms": {name: mean(v) for name, v in zip(self._terms, values[_FIXED:], strict=True)},
            "nonfinite": int(nonfinite),
            "worst_run": int(worst_run),
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
        }

    @property
    def started(self) -> bool:
        """Whether this process flushed once (its mean throughput is timed from there)."""
        return self._flushes > 0

    @property
    def pending(self) -> bool:
        """Whether steps were taken since the last flush."""
        return self._steps_since_flush > 0

    # --- results and checkpoints -----------------------------------------------------------------

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10 steps that were not skipped (a host read: call at the end)."""
        if not self._recent:
            return None
        recent = torch.stack(list(self._recent))
        recent = recent[torch.isfinite(recent)]
        return float(recent.mean()) if recent.numel() else None

    @property
    def tokens_per_second(self) -> float:
        """Mean throughput of this process's run (real tokens of all ranks per second)."""
        return self.run_tokens / self.run_seconds if self.run_seconds else 0.0

    def state_dict(self) -> dict:
        """Plain numbers (loads with `weights_only=True`); flush first."""
        return {
            "tokens_seen": self.tokens_seen,
            "loss_first": self.loss_first,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.loss_first = state.get("loss_first")
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
