"""Training bookkeeping that never stops the device: counters live on it, read once per interval.

A GPU runs ahead of the host as long as nothing reads a tensor's value. A step records one
device row (its loss and loss terms, one `stack`) and its skip flag; the real-token count of each
batch is a host int, known before the batch is transferred. `flush()` sums the interval's rows,
reduces the sums over DDP ranks with one all-reduce and reads everything with one `.tolist()`:
the only host synchronisation, once per logging interval. The runs of skipped steps, the first
loss and the last losses are then counted on the host from the values read. A checkpoint taken
inside an interval carries the interval's steps so far (their loss sums, reduced) to the resumed
run's first flush: every step is logged once, whatever the checkpoint and logging intervals.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch

# Positions in the vector that `flush()` all-reduces; the loss terms' sums follow.
_TOKENS, _LOSS_SUM, _LOSS_COUNT, _NONFINITE = range(4)
_FIXED = 4


class TrainingMeter:
    """Tokens, losses and non-finite steps of a run, exact across ranks and resumes."""

    def __init__(self):
        self.tokens_seen = 0  # real tokens of all ranks, up to the last flush
        self.nonfinite_steps = 0  # skipped steps (non-finite loss or gradient), whole run
        self.loss_first: float | None = None
        self.run_tokens = 0  # timed tokens and seconds of this process (start-up excluded)
        self.run_seconds = 0.0
        self._recent: deque[float] = deque(maxlen=10)  # last flushed losses, NaN where skipped
        self._pending_tokens = 0  # this rank's real tokens since the last flush (host int)
        self._rows: list[torch.Tensor] = []  # per step since the last flush: [1 + terms] float32
        self._skipped: list[torch.Tensor] = []  # per step since the last flush: [] bool
        self._terms: list[str] | None = None  # names of the loss terms, in their order in a row
        self._device = torch.device("cpu")  # of the rows
        self._run = 0  # skipped steps in a row up to the last flush
        self._clock = time.perf_counter()  # reset by `start()`
        self._flushes = 0  # of this process: the first interval includes start-up
        self._carried: dict | None = None  # a checkpoint's unlogged steps, for the next flush

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
        if self._rows and list(terms) != self._terms:
            raise ValueError(f"loss terms changed from {self._terms} to {list(terms)} between "
                             "two flushes of the meter")  # fmt: skip
        self._terms, self._device = list(terms), loss.device
        values = (loss, *terms.values())
        self._rows.append(torch.stack([v.detach().float() for v in values]))  # [1 + terms]
        self._skipped.append(skipped)

    # --- once per interval (one all-reduce, one host read) ------------------------------------

    def flush(self, reduce=None) -> dict:
        """Reduce over ranks (`reduce(tensor) -> summed tensor`, or None), read, reset.

        Returns the interval's figures: tokens (all ranks), mean loss and mean terms (None if
        every step was skipped), skipped steps, the longest run of consecutive skipped steps,
        tokens per second.
        """
        if self._terms is None:
            return {}
        tokens, loss_sum, loss_count, nonfinite, term_sums, step_skipped, step_losses = self._read(
            reduce
        )
        self.nonfinite_steps += int(nonfinite)  # the carried steps are counted in already
        carried, self._carried = _matching(self._carried, self._terms), None
        loss_sum, loss_count, nonfinite, term_sums = _add(
            (loss_sum, loss_count, nonfinite, term_sums), carried
        )
        worst_run = max(self._run, carried["worst_run"] if carried else 0)
        for flag, value in zip(step_skipped, step_losses, strict=True):
            self._run = self._run + 1 if flag else 0
            worst_run = max(worst_run, self._run)
            self._recent.append(math.nan if flag else value)
        if self.loss_first is None and step_losses:
            self.loss_first = step_losses[0]
        now = time.perf_counter()
        seconds = now - self._clock
        if self._flushes:  # the first interval of a process includes start-up: not timed
            self.run_tokens += int(tokens)
            self.run_seconds += seconds
        self._clock = now
        self._flushes += 1
        self.tokens_seen += int(tokens)
        self._pending_tokens = 0
        self._rows, self._skipped = [], []
        mean = (lambda total: total / loss_count) if loss_count else (lambda total: None)
        return {
            "tokens": int(tokens),
            "loss": mean(loss_sum),
            "terms": {name: mean(v) for name, v in zip(self._terms, term_sums, strict=True)},
            "nonfinite": int(nonfinite),
            "worst_run": int(worst_run),
            "tokens_per_second": tokens / seconds if self._flushes > 1 and seconds > 0 else None,
        }

    def _read(self, reduce) -> tuple:
        """The steps since the last flush: tokens, loss sum, kept and skipped steps and the terms'
        sums (all ranks), with this rank's per-step skip flags and losses; one all-reduce, one
        read."""
        steps, n_terms = len(self._rows), len(self._terms)
        acc = torch.zeros(_FIXED + n_terms, dtype=torch.float64, device=self._device)
        losses = skipped = acc[:0]
        if steps:
            rows = torch.stack(self._rows).double()  # [steps, 1 + terms]
            skipped = torch.stack(self._skipped)  # [steps] bool
            kept = torch.where(skipped[:, None], 0.0, rows).sum(0)  # [1 + terms]
            counts = torch.stack([(~skipped).sum(), skipped.sum()]).double()
            acc = torch.cat([acc[:1], kept[:1], counts, kept[1:]])
            losses, skipped = rows[:, 0], skipped.double()
        acc[_TOKENS] = self._pending_tokens
        if reduce is not None:
            acc = reduce(acc)
        values = torch.cat([acc, skipped, losses]).tolist()  # the one host read
        tokens, loss_sum, loss_count, nonfinite = values[:_FIXED]
        term_sums = values[_FIXED : _FIXED + n_terms]
        step_skipped = values[_FIXED + n_terms : _FIXED + n_terms + steps]
        step_losses = values[_FIXED + n_terms + steps :]
        return tokens, loss_sum, loss_count, nonfinite, term_sums, step_skipped, step_losses

    @property
    def started(self) -> bool:
        """Whether this process flushed once (its mean throughput is timed from there)."""
        return self._flushes > 0

    @property
    def pending(self) -> bool:
        """Whether steps were taken since the last flush."""
        return bool(self._rows)

    # --- results and checkpoints -----------------------------------------------------------------

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10 steps that were not skipped (a host read: call at the end)."""
        recent = list(self._recent)
        if self._rows:  # not flushed yet
            rows = torch.stack(self._rows)[:, 0].tolist()
            skipped = torch.stack(self._skipped).tolist()
            recent += [math.nan if s else v for v, s in zip(rows, skipped, strict=True)]
        kept = [v for v in recent[-10:] if math.isfinite(v)]
        return sum(kept) / len(kept) if kept else None

    @property
    def tokens_per_second(self) -> float:
        """Mean throughput of this process's run (real tokens of all ranks per second)."""
        return self.run_tokens / self.run_seconds if self.run_seconds else 0.0

    def state_dict(self, reduce=None, logged: bool = False) -> dict:
        """Plain numbers (loads with `weights_only=True`), exact: the steps since the last flush
        are counted in (an all-reduce and a read), and left to the next flush to log. Unless
        that flush comes right after the checkpoint (`logged`), their sums go with the state
        (`unlogged`), for a resumed run's first flush to log them."""
        state = {"tokens_seen": self.tokens_seen, "loss_first": self.loss_first,
                 "nonfinite_steps": self.nonfinite_steps, "recent_losses": list(self._recent),
                 "skip_run": self._run, "unlogged": None if logged else self._carried}  # fmt: skip
        if self._rows:
            tokens, loss_sum, loss_count, nonfinite, term_sums, skipped, losses = self._read(reduce)
            state["tokens_seen"] += int(tokens)
            state["nonfinite_steps"] += int(nonfinite)
            if state["loss_first"] is None:
                state["loss_first"] = losses[0]
            steps = [math.nan if s else v for s, v in zip(skipped, losses, strict=True)]
            state["recent_losses"] = (state["recent_losses"] + steps)[-self._recent.maxlen :]
            carried = _matching(self._carried, self._terms)
            worst_run = max(self._run, carried["worst_run"] if carried else 0)
            for flag in skipped:
                state["skip_run"] = state["skip_run"] + 1 if flag else 0
                worst_run = max(worst_run, state["skip_run"])
            loss_sum, loss_count, nonfinite, term_sums = _add(
                (loss_sum, loss_count, nonfinite, term_sums), carried
            )
            state["unlogged"] = None if logged else {
                "loss_sum": loss_sum, "loss_count": loss_count, "nonfinite": nonfinite,
                "terms": dict(zip(self._terms, term_sums, strict=True)), "worst_run": worst_run,
            }  # fmt: skip
        return state

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.loss_first = state.get("loss_first")
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._recent.clear()
        self._recent.extend(float(v) for v in state.get("recent_losses", []))  # for final_loss
        self._run = int(state.get("skip_run", 0))
        self._carried = state.get("unlogged")


def _matching(carried: dict | None, terms: list[str] | None) -> dict | None:
    """The carried sums, where their loss terms are this interval's (a resume may change the
    method with `resume.allow`: its unlogged steps are then not logged)."""
    if carried is None or terms is None or list(carried["terms"]) != terms:
        return None
    return carried


def _add(sums: tuple, carried: dict | None) -> tuple:
    """(loss sum, loss count, skipped steps, term sums) plus the carried ones (all ranks')."""
    if carried is None:
        return sums
    loss_sum, loss_count, nonfinite, term_sums = sums
    return (loss_sum + carried["loss_sum"], loss_count + carried["loss_count"],
            nonfinite + carried["nonfinite"],
            [v + c for v, c in zip(term_sums, carried["terms"].values(), strict=True)])  # fmt: skip
