"""Teacher-assistant distillation as one LightningModule (docs/methods.md section 4).

    teacher --stage 1 (`assistant/...` metrics)--> assistant --stage 2 (`train/...`)--> student
    global step:  0 ............................ switch_step ................... switch_step + S

`TeacherAssistantChain` holds two `DistillationMethod`s and trains them in one fit, switching at
a step boundary: stage 1 distils the teacher into the assistant, stage 2 distils the assistant
(a frozen copy of it in the teacher's dtype, its last layer) into the student. With a finished
assistant from the cache, stage 1 is not built (`stage1` None, `switch_step` 0) and the module is
stage 2 alone.

Each stage trains exactly as a run of its own would, so a student is the same whether its
assistant was trained in the same job or taken from the cache:

* one AdamW holds both stages' parameter groups; a stage's groups have its own warmup/decay
  schedule and learning rate 0 outside it, and parameters of the idle stage get no gradient,
  so AdamW leaves them (and their moments) alone: stage 2's moments and step counts start fresh
  at the switch, and stage 1's are dropped there;
* at the switch the data stream restarts from its beginning (`StagedData`), the RNG is put back
  to the state a fresh stage-2 run has (seeded, then built), a gradient scaler to its initial
  scale, and each method sees its own stage's step count (`StageTrainer`);
* each method keeps its own records (meter, non-finite steps, RNG); one checkpoint holds both.

The run around it (cache, export of the assistant at the switch, summary) is `lmdistill.assistant`.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from lmdistill.distributed import gather_from_ranks
from lmdistill.errors import UserError
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.optim import parameter_groups
from lmdistill.schedule import LinearWarmupDecay, linear_warmup_decay_factor

STAGES = ("assistant", "student")  # stage 1, stage 2: the keys of their records and metrics
ASSISTANT_PREFIX = "assistant/"  # stage 1's metrics: assistant/train/loss, ...; stage 2's as usual
CHAIN_KEY = "lmdistill_assistant_chain"  # checkpoint entry: where the chain switches
_FRESH_LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale (Lightning's 16-mixed)


class StageTrainer:
    """The Trainer as one stage's method sees it, as if the stage were a run of its own:
    `global_step` counts the stage's steps (a once-for-all sampler, a logging interval),
    `max_steps` is the stage's, and only the last stage may stop training (`should_stop`);
    everything else is the Trainer's."""

    def __init__(self, trainer, offset: int, steps: int | None = None, last: bool = True):
        for name, value in (("_trainer", trainer), ("_offset", offset), ("_steps", steps),
                            ("_last", last)):  # fmt: skip
            object.__setattr__(self, name, value)

    @property
    def global_step(self) -> int:
        return max(0, self._trainer.global_step - self._offset)

    @property
    def max_steps(self) -> int:
        return self._trainer.max_steps if self._steps is None else self._steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "should_stop" and not self._last:
            return  # the end of stage 1 is the switch, not the end of training
        setattr(self._trainer, name, value)


def stage_factor(step: int, warmup: int, total: int, start: int, end: int | None) -> float:
    """A stage's learning-rate factor at global `step`: its warmup/decay over its own steps
    `start`..`end` (end None: open), 0 outside them."""
    if step < start or (end is not None and step >= end):
        return 0.0
    return linear_warmup_decay_factor(step - start, warmup, total)


class StagedWarmupDecay(LinearWarmupDecay):
    """`LinearWarmupDecay` with a factor per parameter group (`stage_factor` partials), resumed
    the same way: the step count from the checkpoint, this run's settings."""

    def __init__(self, optimizer: torch.optim.Optimizer, factors: list):
        super().__init__(optimizer, 0, 1)
        self.lr_lambdas = list(factors)
        for group, base, factor in zip(optimizer.param_groups, self.base_lrs, self.lr_lambdas,
                                       strict=True):  # fmt: skip
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in optimizer.param_groups]


def warmup_steps(settings, total: int) -> int:
    """The warmup of a method's `optim` settings over `total` steps (as `configure_adamw`)."""
    warmup = settings.warmup_steps
    return round(settings.warmup_ratio * total) if warmup is None else int(warmup)


def capture_rng() -> dict:
    """Python, NumPy and CPU torch RNG states (CUDA's is re-seeded, never read: reading it
    would initialise CUDA on every visible device before the ranks are placed)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}  # fmt: skip


def restore_rng(states: dict) -> None:
    """Put back what `capture_rng` took."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def reset_loss_scale(scaler) -> None:
    """A gradient scaler (16-mixed) back to the scale a fresh run starts with."""
    if scaler is None or not scaler.is_enabled():
        return
    state = scaler.state_dict()
    state.update(scale=_FRESH_LOSS_SCALE, _growth_tracker=0)
    scaler.load_state_dict(state)


class TeacherAssistantChain(L.LightningModule):
    """Stage 1 (`stage1`: teacher -> assistant, None when the assistant comes from the cache),
    then stage 2 (`stage2`: assistant -> student) from global step `switch_step` on.

    student_steps: the optimizer steps of stage 2. seed: the run's seed. stage2_rng: the RNG
    states right after stage 2 was built (`capture_rng`), which a fresh stage-2 run trains
    from. on_switch(chain): called on every rank before stage 2's first step of this process
    (the assistant's export; rank 0 writes it where it is missing).
    """

    def __init__(
        self,
        stage1: DistillationMethod | None,
        stage2: DistillationMethod,
        switch_step: int,
        student_steps: int,
        seed: int,
        stage2_rng: dict | None = None,
        on_switch: Callable[[TeacherAssistantChain], None] | None = None,
    ):
        super().__init__()
        if stage1 is None and switch_step != 0:
            raise ValueError("without stage 1 the chain starts in stage 2 (switch_step=0)")
        if stage1 is not None and (switch_step < 1 or stage2_rng is None):
            raise ValueError("stage 1 needs switch_step >= 1 and stage 2's RNG states")
        self.stage1 = stage1
        self.stage2 = stage2
        self.switch_step = int(switch_step)
        self.student_steps = int(student_steps)
        self.seed = int(seed)
        self.stage2_rng = stage2_rng
        self.on_switch = on_switch
        self.record: dict = {}  # more of the chain for its checkpoints (the run's cache key, ...)
        self._in_stage2 = stage1 is None  # this process has set stage 2 up (teacher weights, ...)
        self._batch_step = 0  # the global step the current batch trains (not a submodule)
        if stage1 is not None:
            stage1.log_prefix = ASSISTANT_PREFIX
        if any(is_overridden("validation_step", m, L.LightningModule) for m in self.methods()):
            self.validation_step = self._validation_step  # held-out losses of the active stage

    # --- which stage ---------------------------------------------------------------------------

    def methods(self) -> list[DistillationMethod]:
        return [m for m in (self.stage1, self.stage2) if m is not None]

    def stage_of(self, step: int) -> DistillationMethod:
        """The method that trains global step `step`."""
        return self.stage1 if self.stage1 is not None and step < self.switch_step else self.stage2

    @property
    def active(self) -> DistillationMethod:
        """The method of the current step; while validating, the method of the step just
        trained (a validation at the switch validates the assistant)."""
        trainer = self._trainer
        if trainer is None:
            return self.stage_of(0)
        if trainer.training:
            return self.stage_of(trainer.global_step)
        return self.stage_of(max(0, trainer.global_step - 1))

    @property
    def assistant(self):
        """The assistant model (stage 1's student; stage 2's teacher), when trained here."""
        return self.stage1.student if self.stage1 is not None else None

    @property
    def trainer(self):
        return L.LightningModule.trainer.fget(self)

    @trainer.setter
    def trainer(self, trainer) -> None:
        """Each method gets the Trainer as its stage sees it (`StageTrainer`)."""
        self._trainer = trainer
        views = {self.stage1: (0, self.switch_step, False),
                 self.stage2: (self.switch_step, self.student_steps, True)}  # fmt: skip
        for method in self.methods():
            offset, steps, last = views[method]
            method.trainer = None if trainer is None else StageTrainer(trainer, offset, steps, last)

    @property
    def log_prefix(self) -> str:
        """The active stage's (stage 1: "assistant/"): what callbacks log goes under it."""
        return self.active.log_prefix

    def log(self, name: str, value, *args, **kwargs) -> None:
        """`LightningModule.log` under the active stage's `log_prefix` (callbacks log here)."""
        super().log(self.log_prefix + name, value, *args, **kwargs)

    @property
    def teacher(self):
        """The active stage's teacher (for callbacks that probe the models)."""
        return self.active.teacher

    @property
    def student(self):
        """The active stage's student: the assistant in stage 1, the student in stage 2."""
        return self.active.student

    @contextlib.contextmanager
    def _calling(self, method: DistillationMethod):
        """Run a hook of `method` as part of the chain's current hook (its `self.log` works)."""
        method._current_fx_name = self._current_fx_name
        try:
            yield method
        finally:
            method._current_fx_name = None

    # --- built once ------------------------------------------------------------------------------

    def compile_models(self, backend: str = "inductor") -> None:
        for method in self.methods():
            method.compile_models(backend)

    def setup(self, stage: str) -> None:
        """Every rank must have planned the same chain (a cached assistant or not)."""
        plans = gather_from_ranks((self.switch_step, self.stage1 is not None))
        if len(set(plans)) > 1:
            raise UserError(
                f"the ranks of this job disagree on the teacher assistant (switch steps "
                f"{[p[0] for p in plans]}): another job finished the same assistant while this "
                "one started; run the command again (it reuses the finished assistant)"
            )

    def configure_optimizers(self):
        """One fused AdamW over both stages' groups; each group has its stage's schedule."""
        groups, factors = [], []
        stages = ((self.stage1, 0, self.switch_step, self.switch_step),
                  (self.stage2, self.switch_step, None, self.student_steps))  # fmt: skip
        for name, (method, start, end, total) in zip(STAGES, stages, strict=True):
            if method is None:
                continue
            settings = method.optim
            factor = functools.partial(stage_factor, warmup=warmup_steps(settings, total),
                                       total=total, start=start, end=end)  # fmt: skip
            for group, role in zip(parameter_groups(method, settings.weight_decay),
                                   ("decay", "no_decay"), strict=True):  # fmt: skip
                groups.append({**group, "name": f"{name}/{role}", "lr": settings.lr,
                               "betas": tuple(settings.betas), "eps": settings.eps})  # fmt: skip
                factors.append(factor)
        optimizer = torch.optim.AdamW(groups, fused=True)  # see methods/optim.py
        scheduler = StagedWarmupDecay(optimizer, factors)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- the training step: the active stage's ---------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._batch_step = self.trainer.global_step  # `active`'s step
        with self._calling(self.active) as method:
            return method.training_step(batch, batch_idx)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:  # fmt: skip
        with self._calling(self.active) as method:
            method.configure_gradient_clipping(optimizer, gradient_clip_val,
                                               gradient_clip_algorithm)  # fmt: skip

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        with self._calling(self.active) as method:
            return method.on_before_batch_transfer(batch, dataloader_idx)

    def _validation_step(self, batch, batch_idx: int, *args):
        method = self.active
        if not is_overridden("validation_step", method, L.LightningModule):
            return None
        with self._calling(method):
            return method.validation_step(batch, batch_idx, *args)

    # --- hooks -----------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        active = self.active
        with self._calling(active):
            active.on_fit_start()  # its teacher to the device; each rank its own dropout
        if active is self.stage1:
            self.stage2.teacher.to(self.device)  # the assistant's frozen copy, filled at the switch

    def on_train_start(self) -> None:
        with self._calling(self.active) as method:
            method.on_train_start()

    def on_validation_start(self) -> None:
        with self._calling(self.active) as method:
            method.on_validation_start()

    def on_validation_end(self) -> None:
        with self._calling(self.active) as method:
            method.on_validation_end()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        step = self.trainer.global_step  # training: `active` is this step's method
        if not self._in_stage2 and step >= self.switch_step:
            self._enter_stage2(fresh=step == self.switch_step)
        with self._calling(self.active) as method:
            method.on_train_batch_start(batch, batch_idx)  # restores the RNG after a resume

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """The hook of the method that trained the batch: after stage 1's last step, `active`
        (the next step's) is stage 2 already, and its logging step is stage 1's to log."""
        with self._calling(self.stage_of(self._batch_step)) as method:
            method.on_train_batch_end(outputs, batch, batch_idx)

    def on_train_end(self) -> None:
        """The last, partial logging interval of the active stage."""
        self.active.flush_to_loggers()

    def _enter_stage2(self, fresh: bool) -> None:
        """At the switch (`fresh`) or on resuming in stage 2: the assistant's weights into stage
        2's teacher; stage 1's teacher and optimizer state released."""
        self.stage1.flush_to_loggers()  # stage 1 ends (at step switch_step - 1), as a run would
        if self.on_switch is not None:  # also on resuming: an export lost since is written again
            with _rng_kept(self.device):  # stage 2's RNG is set already (`start_stage2_rng`)
                self.on_switch(self)
        self.trainer.strategy.barrier("lmdistill.assistant")
        if fresh:
            self.stage2.records.rng_to_restore = None  # a fresh stage 2: `start_stage2_rng`
            reset_loss_scale(getattr(self.trainer.precision_plugin, "scaler", None))
        load_teacher_weights(self.stage2.teacher.model, self.assistant)
        self.stage1.teacher.to("cpu")
        for optimizer in self.trainer.optimizers:
            for parameter in self.stage1.parameters():
                optimizer.state.pop(parameter, None)  # moments stage 1 never uses again
        if fresh:
            with self._calling(self.stage2) as method:
                method.on_train_start()  # its throughput clock
        self._in_stage2 = True

    def start_stage2_rng(self) -> None:
        """Put the RNG where a fresh stage-2 run has it when its data loader starts: the states
        after stage 2 was built, CUDA seeded, each rank re-seeded (`DistillationMethod.on_fit_start`)."""
        restore_rng(self.stage2_rng)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(self.seed)
        if self.trainer.world_size > 1:
            torch.manual_seed(self.seed + self.trainer.global_rank)

    # --- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        states = {}
        for name, method in self._named_methods():
            record: dict = {}
            method.on_save_checkpoint(record)  # exact counts and every rank's RNG (collective)
            states[name] = record["lmdistill"]
        world = self.trainer.world_size if self._trainer is not None else 1
        checkpoint["lmdistill"] = {"world_size": world, "stages": states}
        checkpoint[CHAIN_KEY] = {**self.record, "switch_step": self.switch_step,
                                 "trains_assistant": self.stage1 is not None}  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("lmdistill", {}).get("stages", {})
        active = self.stage_of(int(checkpoint.get("global_step", 0)))
        for name, method in self._named_methods():
            method.on_load_checkpoint({"lmdistill": states.get(name, {})})
            if method is not active:
                method.records.rng_to_restore = None  # only the active stage resumes its RNG

    def _named_methods(self):
        return [(n, m) for n, m in zip(STAGES, (self.stage1, self.stage2), strict=True) if m]


def load_teacher_weights(teacher_model: torch.nn.Module, assistant: torch.nn.Module) -> None:
    """The assistant's weights into stage 2's teacher (same architecture; cast to its dtype)."""
    with torch.no_grad():
        missing, _ = teacher_model.load_state_dict(assistant.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"stage 2's teacher has weights the assistant lacks: {missing[:3]}")


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """Whatever runs inside leaves every RNG (CPU, this CUDA device, Python, NumPy) as it was."""
    states = capture_rng()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    restore_rng(states)


class StagedLoader:
    """The training batches of a chain: stage 1's (`first_batches` of them, over as many epochs
    of the stream as that takes), then stage 2's from the beginning of the stream, as a run of
    its own reads them. Each stage's epochs are Lightning epochs; the switch ends one.

    `make_loader()` builds a fresh `ResumableDataLoader`; `before_restart()` runs right before
    stage 2's loader starts (its RNG, see `TeacherAssistantChain.start_stage2_rng`). The state
    (`DataPositionCallback` gathers it per rank) is the position of the last trained batch.
    """

    def __init__(self, make_loader: Callable, first_batches: int, before_restart: Callable):
        self.make_loader = make_loader
        self.first_batches = int(first_batches)
        self.before_restart = before_restart
        self.loaders: dict[str, Any] = {"assistant": make_loader(), "student": None}
        self.yielded = 0  # stage 1's batches taken from its loader
        self.consumed = 0  # stage 1's batches that started training
        self.stage = "assistant"  # of the last batch that started training
        self._sources: deque[str] = deque()  # stage of each batch yielded, not yet trained

    def __iter__(self):
        self._sources.clear()
        if self.yielded < self.first_batches:
            return self._stage1()
        if self.loaders["student"] is None:
            self.loaders["assistant"] = None  # its workers go
            self.before_restart()
            self.loaders["student"] = self.make_loader()
        return self._stage2(iter(self.loaders["student"]))

    def _stage1(self):
        for batch in self.loaders["assistant"]:
            self.yielded += 1
            self._sources.append("assistant")
            yield batch
            if self.yielded >= self.first_batches:
                return  # the switch: this epoch ends, the next one is stage 2's

    def _stage2(self, iterator):
        for batch in iterator:
            self._sources.append("student")
            yield batch

    def mark_batch_consumed(self) -> None:
        if not self._sources:
            return
        self.stage = self._sources.popleft()
        if self.stage == "assistant":
            self.consumed += 1
        self.loaders[self.stage].mark_batch_consumed()

    def state_dict(self) -> dict:
        if self.stage == "assistant":
            return {"stage": "assistant", "batches": self.consumed,
                    "loader": self.loaders["assistant"].state_dict()}  # fmt: skip
        return {"stage": "student", "loader": self.loaders["student"].state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._sources.clear()
        self.stage = state["stage"]
        if self.stage == "assistant":
            self.loaders["assistant"].load_state_dict(state["loader"])
            self.yielded = self.consumed = int(state["batches"])
        else:  # resuming inside stage 2
            self.yielded = self.consumed = self.first_batches
            self.loaders["assistant"] = None
            self.loaders["student"] = self.make_loader()
            self.loaders["student"].load_state_dict(state["loader"])


class StagedData(L.LightningDataModule):
    """The shared DataModule, serving a `StagedLoader` of its training batches."""

    def __init__(self, data: L.LightningDataModule, first_batches: int, before_restart: Callable):
        super().__init__()
        self.data = data
        self.first_batches = first_batches
        self.before_restart = before_restart
        if is_overridden("val_dataloader", data, L.LightningDataModule):
            self.val_dataloader = data.val_dataloader  # held-out batches, as they are

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer  # its ranks' shards
        self.data.setup(stage)

    def train_dataloader(self) -> StagedLoader:
        return StagedLoader(self.data.train_dataloader, self.first_batches, self.before_restart)

    def teardown(self, stage: str) -> None:
        self.data.teardown(stage)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.data.load_state_dict(state_dict)
