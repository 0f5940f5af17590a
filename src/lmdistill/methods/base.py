"""The one base of every distillation method.

A method is a LightningModule that states which teacher features it needs
(`teacher_request`) and computes its loss from a batch (`step_loss`); it may run several
student passes per teacher pass and own extra modules. Everything else is shared here: the
frozen teacher's features, the student's encoder inputs, freezing what the loss cannot reach
(`freeze_unreached`, called once the method is built), the optimizer, and the bookkeeping
(`bookkeeping.StepRecords`: meter, clipping and non-finite skips, RNG for exact resume).

A training step, top to bottom: `step_loss(batch)` -> (loss, named terms) -> the records.
A validation step (held-out batches, every `trainer.val_check_interval` batches and at the last
step): `validation_loss(batch)` (`step_loss` unless a method says otherwise) in eval mode without
gradients, logged as `val/loss` and `val/loss_<term>`: the mean over the validation batches,
reduced over DDP ranks by Lightning (`sync_dist`).
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch
from transformers import PreTrainedModel

from lmdistill.errors import UserError
from lmdistill.hardware import compile_layers
from lmdistill.losses import RelationPlan
from lmdistill.methods.bookkeeping import (
    NonFiniteLossError,
    StepRecords,
    rng_states,
    set_rng_states,
)
from lmdistill.methods.optim import OptimSettings, configure_adamw
from lmdistill.models.capture import encoder_layers
from lmdistill.models.describe import experts_of, student_gflops
from lmdistill.models.features import FeatureRequest, Features
from lmdistill.models.teacher import Teacher


class DistillationMethod(L.LightningModule):
    """Distil a frozen `teacher` into `student`. Subclasses define `teacher_request`,
    `step_loss` and `summary_fields`, and set `accepts_moe` if they train MiniMoE students."""

    accepts_moe: ClassVar[bool] = False  # whether MiniMoE students (moe other than 1x1) are trained
    log_prefix: str = ""  # before every name it logs (stage 1 of a teacher assistant: "assistant/")

    def __init__(self, teacher: Teacher, student: PreTrainedModel,
                 optim: dict | OptimSettings | None = None):  # fmt: skip
        super().__init__()
        experts = experts_of(student)
        if experts != (1, 1) and not self.accepts_moe:
            raise UserError(
                f"{type(self).__name__} distils dense students but moe={experts[0]}x{experts[1]} "
                "builds a MiniMoE student; use method=minimoe or moe=1x1"
            )
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never in DDP or checkpoints
        self.student = student
        self.optim = optim if isinstance(optim, OptimSettings) else OptimSettings(**(optim or {}))
        self.records = StepRecords(self.optim.max_nonfinite_steps)
        self.frozen_parameters: list[str] = []  # set by `freeze_unreached`
        self.batch_plan: RelationPlan | None = None  # of the current batch, host side
        self.last_validation: dict[str, float] = {}  # val/* figures of the last validation
        self._rng_before_validation: dict | None = None
        self._step_end_due = False  # an optimizer step whose `on_train_batch_end` is still to run

    # --- what a method defines -------------------------------------------------------------

    def teacher_request(self) -> FeatureRequest:
        """The teacher features `step_loss` reads (the teacher computes exactly these)."""
        raise NotImplementedError

    def step_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch and its named float32 scalar terms (logged)."""
        raise NotImplementedError

    def summary_fields(self) -> dict:
        """Method settings recorded in summary.json and the export's provenance; subclasses
        add theirs to these (the last validation's figures: `val_loss`, `val_stsb_spearman`,
        ..., and its `val_step`)."""
        return {key.replace("/", "_"): value for key, value in self.last_validation.items()}

    def validation_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The held-out loss of a batch and its named terms: the training loss of one fixed
        network (`step_loss`; a method that samples networks evaluates a defined one)."""
        return self.step_loss(batch)

    def export_extras(self, out_dir, tokenizer: str, provenance: dict) -> dict:
        """Rank 0, after the student's export: write further exports; returns summary.json keys."""
        return {}

    # --- shared pieces for `step_loss` --------------------------------------------------------

    def teacher_features(self, batch: dict) -> Features:
        """The requested teacher features of `batch` (inference tensors, never saved for backward)."""
        mask = encoder_mask(self.teacher.model, batch["attention_mask"], self.batch_plan)
        return self.teacher.features(self.teacher_request(), input_ids=batch["input_ids"],
                                     attention_mask=mask, token_type_ids=batch.get("token_type_ids"))  # fmt: skip

    def student_inputs(self, batch: dict) -> dict:
        """Keyword inputs of the student for `batch` (a mask that needs no host read)."""
        inputs = model_inputs(batch, self.student.config)
        inputs["attention_mask"] = encoder_mask(
            self.student, batch["attention_mask"], self.batch_plan
        )
        return inputs

    # --- built once ----------------------------------------------------------------------------

    def freeze_unreached(self) -> list[str]:
        """Freeze the parameters `step_loss` cannot reach, found by one tiny backward pass; call
        once the method is built. They stay out of the optimizer and DDP (no
        `find_unused_parameters`) and are trained only at fine-tuning (e.g. with the last-layer
        relation site: the last layer's attention output, FFN and the pooler)."""
        batch = {
            "input_ids": torch.zeros(1, 4, dtype=torch.long),
            "attention_mask": torch.ones(1, 4, dtype=torch.long),
            "token_type_ids": torch.zeros(1, 4, dtype=torch.long),
        }
        with torch.enable_grad():
            loss, _ = self.step_loss(batch)
            loss.backward()
        frozen = []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.requires_grad_(False)
                frozen.append(name)
            parameter.grad = None
        self.frozen_parameters = frozen
        return frozen

    def compile_models(self, backend: str = "inductor") -> None:
        """`torch.compile` the layers of student and teacher (in place: names and hooks kept)."""
        compile_layers(encoder_layers(self.student), backend)
        compile_layers(encoder_layers(self.teacher.model), backend)

    def student_gflops(self, seq_len: int = 128) -> float:
        """Inference GFLOPs of the exported student for one sequence."""
        return student_gflops(self.student, seq_len)

    # --- the training step ---------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, terms = self.step_loss(batch)
        self.records.add_micro_batch(loss, terms, self._trainer)
        return loss  # a non-finite loss is skipped on the device (`configure_gradient_clipping`)

    def log(self, name: str, value, *args, **kwargs) -> None:
        """`LightningModule.log` under `log_prefix` (`log_dict` logs through it too)."""
        super().log(self.log_prefix + name, value, *args, **kwargs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """`val/loss` and `val/loss_<term>`: means over the validation batches (each batch
        weighs the same, as each step in `train/loss`), reduced over ranks."""
        loss, terms = self.validation_loss(batch)
        metrics = {"val/loss": loss, **{f"val/loss_{k}": v for k, v in terms.items()}}
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:  # fmt: skip
        """Clip by norm and skip non-finite updates, on the device (`grad_guard`); every step."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise UserError(
                f"trainer.gradient_clip_algorithm={gradient_clip_algorithm} is not supported; "
                "lmdistill clips by norm: remove the setting"
            )
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.records.end_step(optimizer, gradient_clip_val, scaler)
        self._step_end_due = True  # checkpoint callbacks run before `on_train_batch_end`

    def configure_optimizers(self):
        return configure_adamw(self, self.optim, self.trainer.estimated_stepping_batches)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        mask = batch["attention_mask"]  # [B, L] on the host: reading it costs no device sync
        if self._trainer is None or self._trainer.training:  # validation tokens are not trained
            self.meter.add_batch_tokens(int(mask.sum()))
        self.batch_plan = RelationPlan.of(mask)
        return batch

    # --- bookkeeping hooks (host reads once per logging interval) ------------------------------

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        if self.trainer.world_size > 1:  # every rank was seeded alike: give each its own dropout
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_start(self) -> None:
        self.meter.start()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.records.restore_rng()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        if self.records.micro_batches:  # inside an accumulation window
            return
        self._step_end_due = False
        if not self._flushes_at_step_end():
            return
        if self._stopping():
            # training ends here; stopping (rather than only ending) makes Lightning validate the
            # final student too, whatever `val_check_interval` (nothing else differs)
            self.trainer.should_stop = True
        # a stopping step is a logging step for Lightning, which would otherwise log the previous
        # interval's figures again: the last, partial interval is flushed here
        if self.trainer._logger_connector.should_update_logs:
            self.log_dict(self.records.flush(self.trainer, batch["input_ids"].shape[0]))
        else:  # the first step, its own row: intervals are timed from here
            self.flush_to_loggers(batch["input_ids"].shape[0])

    def _stopping(self) -> bool:
        return 0 < self.trainer.max_steps <= self.global_step

    def _flushes_at_step_end(self) -> bool:
        """Whether this optimizer step's `on_train_batch_end` flushes the meter: at a logging
        step, the last step, and the first step of this process."""
        logging_step = self.trainer._logger_connector.should_update_logs
        return logging_step or self._stopping() or not self.meter.started

    def on_validation_start(self) -> None:
        """Validation leaves the training's random state as it found it (exact resumes)."""
        self._rng_before_validation = rng_states()

    def on_validation_end(self) -> None:
        """Keep this validation's figures (reduced, read once: validation may sync)."""
        if self._rng_before_validation is not None:
            set_rng_states(self._rng_before_validation)
            self._rng_before_validation = None
        metrics, prefix = self.trainer.callback_metrics, self.log_prefix
        figures = {k[len(prefix) :]: float(v) for k, v in metrics.items()
                   if k.startswith(prefix + "val/")}  # fmt: skip
        self.last_validation = {**figures, "val/step": self.global_step}

    def on_train_end(self) -> None:
        """The last, partial interval (Lightning logs no more now)."""
        self.flush_to_loggers()

    def flush_to_loggers(self, batch_size: int | None = None) -> None:
        """The steps since the last row as a row at the last step taken, straight to the
        loggers: for rows outside Lightning's logging steps."""
        if not self.meter.pending:
            return
        metrics = self.records.flush(self.trainer, batch_size)
        step = self.logged_step()
        for logger in self.loggers:
            logger.log_metrics({self.log_prefix + k: v for k, v in metrics.items()}, step=step)

    def logged_step(self) -> int:
        """The step just trained as the loggers number it: the run's 0-based global step (a
        teacher assistant's stage counts its own steps in `global_step`)."""
        return self.trainer.fit_loop.epoch_loop.global_step - 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The records; a checkpoint of a step that `on_train_batch_end` flushes next (they run
        before it) counts the step's figures as logged, any other carries them unlogged."""
        logged = self._step_end_due and self._flushes_at_step_end()
        checkpoint["lmdistill"] = self.records.state_dict(self._trainer, logged=logged)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.records.load_state_dict(checkpoint.get("lmdistill", {}), self.trainer.global_rank)

    # --- results -------------------------------------------------------------------------------

    @property
    def meter(self):
        return self.records.meter

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10 steps that were not skipped."""
        return self.meter.final_loss

    @property
    def loss_first(self) -> float | None:
        return self.meter.loss_first

    @property
    def tokens_seen(self) -> int:
        """Real (non-pad) tokens trained on, all ranks, up to the last logging interval."""
        return self.meter.tokens_seen

    @property
    def nonfinite_steps(self) -> int:
        return self.meter.nonfinite_steps

    @property
    def tokens_per_second(self) -> float:
        """Mean training throughput of this run (real tokens of all ranks per second)."""
        return self.meter.tokens_per_second


_SDPA_MASK_MODELS = (
    "bert",
    "roberta",
    "xlm-roberta",
    "lmdistill-minimoe",
    "lmdistill-sparse",
    "lmdistill-ofa",
)


def encoder_mask(model, mask: torch.Tensor, plan: RelationPlan | None) -> torch.Tensor | None:
    """The attention mask for a Hugging Face encoder, chosen so that it reads nothing on the host.

    Given a 2-D mask, transformers checks `mask.all()` (a device sync) to skip the mask. The
    host-side plan of the batch answers that instead: no padding gives None (SDPA may then use
    its flash kernel); with padding, BERT-family SDPA attention takes the [B, 1, 1, L] boolean
    mask as it is (and so do the MiniMoE, sparse and once-for-all students). Other models get
    the 2-D mask.
    """
    if plan is not None and min(plan.counts) == mask.shape[1]:
        return None
    config = model.config
    if config.model_type in _SDPA_MASK_MODELS and config._attn_implementation == "sdpa":
        return (mask != 0)[:, None, None, :]  # [B, 1, 1, L], True = attend
    return mask


def model_inputs(batch: dict, config) -> dict:
    """input_ids, attention_mask and (where the model has segment embeddings) token_type_ids."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(config, "type_vocab_size", 0) > 1 and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


__all__ = ["DistillationMethod", "NonFiniteLossError", "encoder_mask", "model_inputs"]
