"""The shared base of every distillation method: teacher, student, relation site, optimisation.

A training step, top to bottom: the frozen teacher gives Q/K/V of its distilled layer; the
student gives Q/K/V at its relation site; the method turns both into named loss terms; their
combination is the loss. Subclasses implement `loss_terms` and `combine` only.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from lmdistill.distributed import gather_from_ranks
from lmdistill.errors import UserError
from lmdistill.models.capture import QKV, forward_qkv
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.teacher import Teacher

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
        self.frozen_parameters = self._freeze_unreached_parameters()
        self.tokens_seen = 0  # real (non-pad) tokens trained on, all ranks
        self.recent_losses: deque[torch.Tensor] = deque(maxlen=10)  # detached: no host sync
        self.loss_first: float | None = None
        self.batches_this_run = 0
        self._clock = 0.0
        self._batch_tokens = 0
        self._rng_to_restore: dict | None = None
        self._run_tokens = 0  # timed tokens and seconds of this run (resumed runs start anew)
        self._run_seconds = 0.0
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient, whole run
        self._nonfinite_in_a_row = 0
        self._last_scale: float | None = None

    # --- what a method defines -------------------------------------------------------------

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        """Named float32 scalar loss terms, e.g. {"qq": ..., "kk": ..., "vv": ...}."""
        raise NotImplementedError

    def combine(self, terms: dict) -> torch.Tensor:
        """The training loss from the terms."""
        raise NotImplementedError

    # --- the forward passes ----------------------------------------------------------------

    def student_qkv(self, batch: dict) -> QKV:
        inputs = _model_inputs(batch, self.student.config)
        if self.relation_site == "last_layer":
            return forward_qkv(self.student, self.student.config.num_hidden_layers - 1, **inputs)
        hidden = self.student(**inputs).last_hidden_state  # [B, L, d]
        return QKV(*self.relation_projection(hidden).chunk(3, dim=-1))

    def teacher_qkv(self, batch: dict) -> QKV:
        """Teacher Q/K/V (inference tensors: the relation losses read them, never save them)."""
        return self.teacher.qkv(
            batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        teacher = self.teacher_qkv(batch)
        student = self.student_qkv(batch)
        terms = self.loss_terms(teacher, student, batch["attention_mask"])
        loss = self.combine(terms)
        finite = self._count_step(loss)
        if not finite:
            return self._skip_nonfinite_step()
        self._nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss_{name}": value for name, value in terms.items()})
        self.loss_first = float(loss.detach()) if self.loss_first is None else self.loss_first
        self.recent_losses.append(loss.detach())
        self.batches_this_run += 1
        return loss

    def _count_step(self, loss: torch.Tensor) -> bool:
        """Add all ranks' tokens of this batch to `tokens_seen`; whether every rank's loss is
        finite (ranks must skip a step together). One sum over ranks, one host sync."""
        local = torch.stack(
            [(~torch.isfinite(loss.detach())).long(), torch.tensor(self._batch_tokens, device=loss.device)]
        )  # fmt: skip
        if self._world_size > 1:
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        nonfinite_ranks, tokens = local.tolist()
        self._batch_tokens = int(tokens)
        self.tokens_seen += self._batch_tokens
        return nonfinite_ranks == 0

    def _skip_nonfinite_step(self) -> None:
        """Skip this step (no backward, no weight update); stop after too many in a row."""
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        limit = self.optim.max_nonfinite_steps
        if self._nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"the loss was not finite for {limit} steps in a row (up to step "
                f"{self.trainer.global_step}); the last finite state is in checkpoints/last.ckpt: "
                "lower optim.lr, use trainer.precision=bf16-mixed or 32, or check the data, then "
                "resume with ckpt_path=last"
            )
        return None  # Lightning skips backward and the optimizer update

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        self._batch_tokens = int(batch["attention_mask"].sum())  # this rank's; on the host batch
        return batch

    # --- bookkeeping -----------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        if self.trainer.world_size > 1:  # every rank was seeded alike: give each its own dropout
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_start(self) -> None:
        self._clock = time.perf_counter()

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # after the resumed loader drew its own seeds
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        tokens = self._batch_tokens
        if self.batches_this_run > 1:  # the first batch of a run includes start-up: not timed
            self._run_tokens += tokens
            self._run_seconds += seconds
        sequences = batch["input_ids"].shape[0] * self._world_size
        self.log("train/tokens_per_second", tokens / max(seconds, 1e-9), prog_bar=True)
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("train/global_batch_size", float(sequences * self.trainer.accumulate_grad_batches))
        self._log_loss_scale()

    def _log_loss_scale(self) -> None:
        """16-mixed: log the gradient scaler's scale and count the steps it skipped (overflow)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        scale = scaler.get_scale()  # host sync, only under 16-mixed
        if self._last_scale is not None and scale < self._last_scale:
            self.nonfinite_steps += 1  # the scaler found inf/NaN gradients and skipped the step
        self._last_scale = scale
        self.log("train/loss_scale", float(scale))
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))

    def student_gflops(self, seq_len: int = 128) -> float:
        """Inference GFLOPs of the exported student for one sequence (methods may override)."""
        c = self.student.config
        return encoder_gflops(c.num_hidden_layers, c.hidden_size, c.intermediate_size, seq_len)

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10 batches of this run."""
        losses = list(self.recent_losses)
        return float(torch.stack(losses).mean()) if losses else None

    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    @property
    def tokens_per_second(self) -> float:
        """Mean training throughput of this run (real tokens of all ranks per second)."""
        return self._run_tokens / self._run_seconds if self._run_seconds else 0.0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lmdistill"] = {
            "tokens_seen": self.tokens_seen,
            "loss_first": self.loss_first,
            "nonfinite_steps": self.nonfinite_steps,
            "world_size": self._world_size,
            "rng": gather_from_ranks(_rng_states()),  # [rank]: every rank's dropout resumes exactly
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lmdistill", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.loss_first = state.get("loss_first")
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
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
        # foreach, not fused: fused AdamW with clipping under mixed precision raises in Lightning;
        # foreach must be asked for on CPU, where the default is a slower per-parameter loop
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
            foreach=True,
        )
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise UserError(
                "the number of training steps is unknown (the corpus is streamed); set trainer.max_steps"
            )
        warmup = self.optim.warmup_steps
        warmup = round(self.optim.warmup_ratio * total) if warmup is None else int(warmup)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, int(total))
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


def _model_inputs(batch: dict, config) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(config, "type_vocab_size", 0) > 1 and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs
