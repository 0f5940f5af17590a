"""The learning-rate schedule: linear warmup, then linear decay to 0 at the last step.

The same schedule as `transformers.get_linear_schedule_with_warmup`, with one difference on
resume. A restored `LambdaLR` keeps the checkpoint's base learning rates, and Lightning restores
the optimizer's param groups (learning rate, betas, eps, weight decay) as they were saved: a run
resumed with another `trainer.max_steps` (or `optim.*`, allowed by `resume.allow`) would train
its first step with the learning rate the *old* schedule set for that step (0 at the end of a
finished run), then jump onto the new schedule; changed optimizer settings would be ignored.
`LinearWarmupDecay.load_state_dict` (called by Lightning after the optimizer's state is
restored) keeps the step count from the checkpoint and puts back this run's settings: the first
resumed step trains with the learning rate this run's schedule has at that step, exactly what an
uninterrupted run with these settings would use. With unchanged settings the restored state is
the same as the saved one, bit for bit.
"""

from __future__ import annotations

import functools

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

_SETTINGS = ("betas", "eps", "weight_decay")  # per param group, from the run's config


def linear_warmup_decay_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate at `step` as a fraction of the peak (transformers' formula)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


class LinearWarmupDecay(LambdaLR):
    """Warmup over `warmup` steps to the optimizer's learning rate, decay to 0 at `total`."""

    def __init__(self, optimizer: Optimizer, warmup: int, total: int):
        self._configured = [{k: g[k] for k in _SETTINGS if k in g} for g in optimizer.param_groups]
        factor = functools.partial(linear_warmup_decay_factor, warmup=warmup, total=total)
        super().__init__(optimizer, factor)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_configured", None)  # this run's settings, never restored from a checkpoint
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        configured_lrs = list(self.base_lrs)
        super().load_state_dict(state_dict)  # the step count (last_epoch) is what resumes
        self.base_lrs = configured_lrs
        for group, settings, base, factor in zip(
            self.optimizer.param_groups, self._configured, self.base_lrs, self.lr_lambdas,
            strict=True,
        ):  # fmt: skip
            group.update(settings)
            group["initial_lr"] = base
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
