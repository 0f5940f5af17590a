"""torchmetrics for each GLUE task's dev set.

Classification metrics take class indices, regression metrics take scores; values are returned
as plain floats (fractions, not percentages) under the names of `TaskSpec.metrics`.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lmdistill.glue.tasks import TaskSpec


class GlueMatthewsCorrCoef(BinaryMatthewsCorrCoef):
    """Matthews correlation that is 0 when the predictions (or labels) are all one class.

    That is the sklearn and GLUE convention; torchmetrics instead returns a small eps-based value
    (+-0.0256 on CoLA dev for a model that calls every sentence acceptable).
    """

    def compute(self) -> torch.Tensor:
        confmat = self.confmat  # [2, 2]: rows are labels, columns predictions
        if (confmat.sum(0) == 0).any() or (confmat.sum(1) == 0).any():
            return torch.tensor(0.0)
        return super().compute()


def _metric(name: str, task: TaskSpec) -> Metric:
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=task.num_labels, average="micro")
    if name == "f1":
        return BinaryF1Score()  # of the positive class (paraphrase, duplicate), as in GLUE
    if name == "mcc":
        return GlueMatthewsCorrCoef()
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise ValueError(f"no metric named {name}")


def build_metrics(task: TaskSpec) -> MetricCollection:
    """One collection for one dev split of `task`."""
    with warnings.catch_warnings():  # Spearman keeps all dev predictions: fine for GLUE sizes
        warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
        return MetricCollection({name: _metric(name, task) for name in task.metrics})


def predictions(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """Class indices [B] from logits [B, C], or scores [B] from a regression head's [B, 1]."""
    logits = logits.float()
    return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)


def compute(collection: MetricCollection) -> dict[str, float]:
    """The collection's values as floats (a degenerate correlation is reported as 0)."""
    values = {}
    for name, value in collection.compute().items():
        value = float(value)
        values[name] = 0.0 if value != value else value  # NaN: constant predictions
    return values
