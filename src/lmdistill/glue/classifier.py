"""A sequence classifier (or STS-B regressor) fine-tuned on one GLUE task.

A training step, top to bottom: the encoder with its classification head returns logits and the
Hugging Face loss (cross-entropy, or MSE for STS-B); AdamW with linear warmup and decay steps.
After every dev epoch the task's metrics are computed and kept in `history`; `results()` picks
the best (or last) epoch by the task's main score.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    get_linear_schedule_with_warmup,
)

from lmdistill.errors import UserError
from lmdistill.glue.metrics import build_metrics, compute, predictions
from lmdistill.glue.tasks import TaskSpec
from lmdistill.models.teacher import quiet_transformers

INITS = ("pretrained", "random")


def _one_process() -> bool:
    """torchmetrics' `distributed_available_fn` of a trainer with one process: nothing to sync."""
    return False


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_classifier(
    name_or_path: str,
    task: TaskSpec,
    init: str = "pretrained",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """`AutoModelForSequenceClassification` with `task`'s head on `name_or_path`.

    init="random" keeps the architecture and config but draws fresh weights (a baseline that shows
    what pre-training or distillation contributes).
    """
    if init not in INITS:
        raise UserError(f"unknown init '{init}'; use one of {', '.join(INITS)}")
    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise UserError(
            f"model directory {name_or_path} does not exist; pass model=<exported student "
            "directory> (e.g. <run>/student) or a Hugging Face model name"
        )
    head = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
    }
    try:
        with quiet_transformers():
            if init == "random":
                config = AutoConfig.from_pretrained(
                    name_or_path, revision=revision, trust_remote_code=trust_remote_code, **head
                )
                return AutoModelForSequenceClassification.from_config(
                    config, trust_remote_code=trust_remote_code
                )
            return AutoModelForSequenceClassification.from_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code, **head
            )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load model '{name_or_path}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}); pass an exported student directory or a "
            "reachable Hugging Face model name"
        ) from err


class GlueClassifier(L.LightningModule):
    def __init__(
        self,
        model: PreTrainedModel,
        task: TaskSpec,
        lr: float = 2e-5,
        weight_decay: float = 0.01,  # not applied to biases and LayerNorm (1-D parameters)
        warmup_ratio: float = 0.1,  # fraction of the optimizer steps
        adam_eps: float = 1e-6,
    ):
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: dropout would stay off
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.adam_eps = adam_eps
        self.split_names = [name for name, _, _ in task.dev_splits]
        self.dev_metrics = torch.nn.ModuleList(build_metrics(task) for _ in self.split_names)
        self.history: list[
            dict
        ] = []  # one per dev evaluation: {"epoch" (1-indexed), "step", "metrics", "score"}
        self.train_examples = 0

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).logits  # [B, C] (C = 1 for STS-B)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = batch.pop("labels")
        preds = predictions(self.task, self(batch))  # [B]
        self.dev_metrics[dataloader_idx].update(preds, labels)

    def setup(self, stage: str) -> None:
        if self.trainer.world_size == 1:  # e.g. lmdistill-distill eval=glue on rank 0 after DDP:
            for collection in self.dev_metrics:  # the job's process group is not this trainer's
                for metric in collection.values():
                    metric.distributed_available_fn = _one_process

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for name, collection in zip(self.split_names, self.dev_metrics, strict=True):
            prefix = "" if len(self.split_names) == 1 else f"{name}_"
            metrics.update({prefix + k: v for k, v in compute(collection).items()})
            collection.reset()
        score = self.task.main_score(metrics)
        if not self.trainer.sanity_checking:
            self.history.append(
                {"epoch": self.current_epoch + 1, "step": self.global_step, "metrics": metrics,
                 "score": score}
            )  # fmt: skip
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})
        self.log("val/score", score, prog_bar=True)

    def results(self, select: str = "best") -> dict:
        """Metrics of the best epoch by main score (`select="best"`) or of the last one."""
        if not self.history:
            raise UserError("no dev evaluation ran; set epochs >= 1 and trainer.max_steps != 0")
        if select not in ("best", "last"):
            raise UserError(f"unknown select '{select}'; use best or last")
        chosen = self.history[-1]
        if select == "best":
            chosen = max(self.history, key=lambda h: h["score"])
        return chosen

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            eps=self.adam_eps,
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(self.warmup_ratio * total), total
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]
