"""The shared base of every distillation method: teacher, student, relation site, optimisation.

A training step, top to bottom: the frozen teacher gives Q/K/V of its distilled layer; the
student gives Q/K/V at its relation site; the method turns both into named loss terms; their
combination is the loss. Subclasses implement `loss_terms` and `combine` only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedModel

from lmdistill.distributed import gather_from_ranks
from lmdistill.errors import UserError
from lmdistill.hardware import compile_layers
from lmdistill.losses import RelationPlan
from lmdistill.models.capture import QKV, encoder_layers, forward_qkv
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.teacher import Teacher
from lmdistill.modules.grad_guard import clip_and_guard
from lmdistill.modules.meter import TrainingMeter
from lmdistill.schedule import LinearWarmupDecay

RELATION_SITES = ("last_layer", "top_projection")


@dataclass
class OptimSettings:
    """AdamW with linear warmup then linear decay to 0 (METHODS.md section 10)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm (1-D parameters)
    warmup_ratio: float = 0.01  # fraction of the total optimizer steps
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a non-finite loss


class DistillationModule(L.LightningModule):
    """Distil a frozen `teacher` into `student` through Q/K/V relations.

    relation_site: "last_layer" reads Q/K/V of the student's last layer (its attention output,
    FFN and pooler are then never computed and are kept out of the optimizer); "top_projection"
    adds a `Linear(d, 3d)` on top of the final hidden states (dropped at export).
    """

    def __init__(
        self,
        teacher: Teacher,
        student: PreTrainedModel,
        relation_site: str = "last_layer",
        optim: dict | OptimSettings | None = None,
    ):
        super().__init__()
        if relation_site not in RELATION_SITES:
            raise UserError(
                f"unknown student.relation_site '{relation_site}'; use one of {', '.join(RELATION_SITES)}"
            )
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never in DDP or checkpoints
        self.student = student
        self.relation_site = relation_site
        if relation_site == "top_projection":
            d = student.config.hidden_size
            self.relation_projection = nn.Linear(d, 3 * d)
        self.optim = optim if isinstance(optim, OptimSettings) else OptimSettings(**(optim or {}))
        self._relation_plan: RelationPlan | None = None  # of the current batch, host side
        self.frozen_parameters = self._freeze_unreached_parameters()
        self.meter = TrainingMeter()
        self._step_loss: torch.Tensor | None = None  # sum of this step's micro-batch losses
        self._step_nonfinite: torch.Tensor | None = None  # [] bool: a loss was not finite
        self._micro_batches = 0
        self._rng_to_restore: dict | None = None

    # --- what a method defines -------------------------------------------------------------

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        """Named float32 scalar loss terms, e.g. {"qq": ..., "kk": ..., "vv": ...}."""
        raise NotImplementedError

    def combine(self, terms: dict) -> torch.Tensor:
        """The training loss from the terms."""
        raise NotImplementedError

    # --- the forward passes ----------------------------------------------------------------

    def compile_models(self, backend: str = "inductor") -> None:
        """`torch.compile` the layers of student and teacher (in place: names and hooks kept)."""
        compile_layers(encoder_layers(self.student), backend)
        compile_layers(encoder_layers(self.teacher.model), backend)

    def student_qkv(self, batch: dict) -> QKV:
        inputs = _model_inputs(batch, self.student.config)
        inputs["attention_mask"] = _encoder_mask(self.student, batch["attention_mask"],
                                                 self._relation_plan)  # fmt: skip
        if self.relation_site == "last_layer":
            return forward_qkv(self.student, self.student.config.num_hidden_layers - 1, **inputs)
        hidden = self.student(**inputs).last_hidden_state  # [B, L, d]
        return QKV(*self.relation_projection(hidden).chunk(3, dim=-1))

    def teacher_qkv(self, batch: dict) -> QKV:
        """Teacher Q/K/V (inference tensors: the relation losses read them, never save them)."""
        mask = _encoder_mask(self.teacher.model, batch["attention_mask"], self._relation_plan)
        return self.teacher.qkv(batch["input_ids"], mask, batch.get("token_type_ids"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        teacher = self.teacher_qkv(batch)
        student = self.student_qkv(batch)
        terms = self.loss_terms(teacher, student, batch["attention_mask"])
        loss = self.combine(terms)
        self._add_micro_batch(loss, terms)
        return loss  # a non-finite loss is skipped on the device (`configure_gradient_clipping`)

    def _add_micro_batch(self, loss: torch.Tensor, terms: dict) -> None:
        """Remember this micro-batch's loss and whether it (on any rank) is not finite."""
        nonfinite = ~torch.isfinite(loss.detach())
        if self._world_size > 1:  # an all-reduce, but no host read
            nonfinite = self.trainer.strategy.reduce(nonfinite.float(), reduce_op="sum") > 0
        first = self._micro_batches == 0
        self._step_loss = loss.detach() if first else self._step_loss + loss.detach()
        self._step_nonfinite = nonfinite if first else self._step_nonfinite | nonfinite
        self._micro_batches += 1
        self._last_terms = {name: value.detach() for name, value in terms.items()}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:  # fmt: skip
        """Clip by norm and skip non-finite updates, on the device (`grad_guard`); every step."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise UserError(
                f"trainer.gradient_clip_algorithm={gradient_clip_algorithm} is not supported; "
                "lmdistill clips by norm: remove the setting"
            )
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        skipped = clip_and_guard(optimizer, gradient_clip_val, self._step_nonfinite, scaler)
        self.meter.add_step(self._step_loss / self._micro_batches, skipped, self._last_terms)
        self._micro_batches = 0

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        mask = batch["attention_mask"]  # [B, L] on the host: reading it costs no device sync
        self.meter.add_batch_tokens(int(mask.sum()))
        self._relation_plan = RelationPlan.of(mask)
        return batch

    # --- bookkeeping (host reads once per logging interval) -----------------------------------

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        if self.trainer.world_size > 1:  # every rank was seeded alike: give each its own dropout
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_start(self) -> None:
        self.meter.start()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # after the resumed loader drew its own seeds
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        if self._micro_batches:  # inside an accumulation window
            return
        if not self.meter.started or self.trainer._logger_connector.should_update_logs:
            self.log_dict(self._flush(batch["input_ids"].shape[0]))

    def on_train_end(self) -> None:
        """The last, partial interval: straight to the loggers (Lightning logs no more now)."""
        if self.meter.pending:
            metrics = self._flush()
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step - 1)

    def _flush(self, batch_size: int | None = None) -> dict:
        """Reduce and read the interval's figures (the one host read); stop on diverging losses."""
        reduce = None
        if self._world_size > 1:
            reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        interval = self.meter.flush(reduce)
        metrics = {"train/tokens_seen": float(self.meter.tokens_seen)}
        if interval.get("loss") is not None:
            metrics["train/loss"] = interval["loss"]
            metrics.update({f"train/loss_{k}": v for k, v in interval["terms"].items()})
        if interval.get("tokens_per_second") is not None:
            metrics["train/tokens_per_second"] = interval["tokens_per_second"]
        if batch_size is not None:
            sequences = batch_size * self._world_size * self.trainer.accumulate_grad_batches
            metrics["train/global_batch_size"] = float(sequences)
        if self.meter.nonfinite_steps:
            metrics["train/nonfinite_steps"] = float(self.meter.nonfinite_steps)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            metrics["train/loss_scale"] = scaler.get_scale()  # ready: the read above waited
        limit = self.optim.max_nonfinite_steps
        if interval.get("worst_run", 0) >= limit:
            raise NonFiniteLossError(
                f"the loss was not finite for {limit} steps in a row (up to step "
                f"{self.trainer.global_step}); the last finite state is in checkpoints/last.ckpt: "
                "lower optim.lr, use trainer.precision=bf16-mixed or 32, or check the data, then "
                "resume with ckpt_path=last"
            )
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        return metrics

    def student_gflops(self, seq_len: int = 128) -> float:
        """Inference GFLOPs of the exported student for one sequence (methods may override)."""
        c = self.student.config
        return encoder_gflops(c.num_hidden_layers, c.hidden_size, c.intermediate_size, seq_len)

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

    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.meter.pending:
            self._flush()  # exact counts in the checkpoint
        checkpoint["lmdistill"] = {
            **self.meter.state_dict(),
            "world_size": self._world_size,
            "rng": gather_from_ranks(_rng_states()),  # [rank]: every rank's dropout resumes exactly
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lmdistill", {})
        self.meter.load_state_dict(state)
        # Restored at the first batch: creating the resumed DataLoader iterator draws from the RNG.
        rng = state.get("rng")
        if isinstance(rng, dict):  # checkpoints of earlier lmdistill versions: rank 0's only
            rng = [rng]
        self._rng_to_restore = rng[self.trainer.global_rank] if rng else None

    # --- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self):
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for _, p in trainable if p.ndim >= 2],
                "weight_decay": self.optim.weight_decay,
            },
            {
                "params": [p for _, p in trainable if p.ndim < 2],
                "weight_decay": 0.0,
            },  # biases, LayerNorm
        ]
        # fused: one kernel for all parameters (4x foreach on CPU), and it skips an update on
        # the device (`found_inf`, see grad_guard); Lightning's clipping is replaced by ours
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
            fused=True,
        )
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise UserError(
                "the number of training steps is unknown (the corpus is streamed); set trainer.max_steps"
            )
        warmup = self.optim.warmup_steps
        warmup = round(self.optim.warmup_ratio * total) if warmup is None else int(warmup)
        # resumable under a changed max_steps or optim (resume.allow): see lmdistill.schedule
        scheduler = LinearWarmupDecay(optimizer, warmup, int(total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _freeze_unreached_parameters(self) -> list[str]:
        """Freeze parameters the relation loss cannot reach (found by one tiny backward pass).

        With the last-layer site these are the last layer's attention output, FFN and the pooler:
        they stay out of the optimizer and DDP (no `find_unused_parameters`) and are trained only
        at fine-tuning.
        """
        batch = {
            "input_ids": torch.zeros(1, 4, dtype=torch.long),
            "attention_mask": torch.ones(1, 4, dtype=torch.long),
            "token_type_ids": torch.zeros(1, 4, dtype=torch.long),
        }
        with torch.enable_grad():
            sum(x.float().sum() for x in self.student_qkv(batch)).backward()
        frozen = []
        for name, parameter in self.named_parameters():
            if parameter.grad is None:
                parameter.requires_grad_(False)
                frozen.append(name)
            parameter.grad = None
        return frozen


class NonFiniteLossError(UserError):
    """Too many consecutive steps had a non-finite loss; the run stops with a checkpoint."""


def _rng_states() -> dict:
    """torch (CPU, CUDA) and Python RNG states; plain tensors and ints, so `weights_only` loads them."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


_SDPA_MASK_MODELS = ("bert", "roberta", "xlm-roberta")


def _encoder_mask(model, mask: torch.Tensor, plan: RelationPlan | None) -> torch.Tensor | None:
    """The attention mask for a Hugging Face encoder, chosen so that it reads nothing on the host.

    Given a 2-D mask, transformers checks `mask.all()` (a device sync) to skip the mask. The
    host-side plan of the batch answers that instead: no padding gives None (SDPA may then use
    its flash kernel); with padding, BERT-family SDPA attention takes the [B, 1, 1, L] boolean
    mask as it is. Other models get the 2-D mask.
    """
    if plan is not None and min(plan.counts) == mask.shape[1]:
        return None
    config = model.config
    if config.model_type in _SDPA_MASK_MODELS and config._attn_implementation == "sdpa":
        return (mask != 0)[:, None, None, :]  # [B, 1, 1, L], True = attend
    return mask


def _model_inputs(batch: dict, config) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(config, "type_vocab_size", 0) > 1 and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs
