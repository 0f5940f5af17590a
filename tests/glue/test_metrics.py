"""Task metrics against values computed by hand with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.glue import get_task
from lmdistill.glue.metrics import build_metrics, compute, predictions

PREDS = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
LABELS = [1, 0, 0, 1, 1, 0, 1, 0, 0, 1]


def _counts():
    p, y = np.array(PREDS), np.array(LABELS)
    tp = float(((p == 1) & (y == 1)).sum())
    tn = float(((p == 0) & (y == 0)).sum())
    fp = float(((p == 1) & (y == 0)).sum())
    fn = float(((p == 0) & (y == 1)).sum())
    return tp, tn, fp, fn


def _run(task: str, preds, labels) -> dict[str, float]:
    metrics = build_metrics(get_task(task))
    metrics.update(torch.tensor(preds[:6]), torch.tensor(labels[:6]))  # two batches
    metrics.update(torch.tensor(preds[6:]), torch.tensor(labels[6:]))
    return compute(metrics)


def test_matthews_correlation():
    tp, tn, fp, fn = _counts()
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert _run("cola", PREDS, LABELS)["mcc"] == pytest.approx(expected, abs=1e-6)


def test_f1_and_accuracy():
    tp, tn, fp, fn = _counts()
    values = _run("mrpc", PREDS, LABELS)
    assert values["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    assert values["accuracy"] == pytest.approx((tp + tn) / len(PREDS), abs=1e-6)
    assert set(_run("qqp", PREDS, LABELS)) == {"f1", "accuracy"}


def test_multiclass_accuracy():
    preds, labels = [0, 2, 1, 1, 2, 0, 0, 1], [0, 2, 2, 1, 0, 0, 1, 1]
    metrics = build_metrics(get_task("mnli"))
    metrics.update(torch.tensor(preds), torch.tensor(labels))
    assert compute(metrics) == {"accuracy": pytest.approx(5 / 8)}


def test_pearson_and_spearman():
    preds = [0.1, 2.3, 1.9, 4.8, 3.0, 0.7, 2.2, 4.1, 3.9, 1.0]
    labels = [0.0, 2.5, 1.5, 5.0, 3.2, 1.0, 1.8, 4.0, 4.4, 0.4]
    p, y = np.array(preds), np.array(labels)
    pearson = np.corrcoef(p, y)[0, 1]
    rank = lambda a: np.argsort(np.argsort(a)).astype(float)  # noqa: E731 - no ties here
    spearman = np.corrcoef(rank(p), rank(y))[0, 1]
    values = _run("stsb", preds, labels)
    assert values["pearson"] == pytest.approx(pearson, abs=1e-5)
    assert values["spearman"] == pytest.approx(spearman, abs=1e-5)
    task = get_task("stsb")
    assert task.main_score(values) == pytest.approx((pearson + spearman) / 2, abs=1e-5)


def test_predictions_and_main_scores():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]], dtype=torch.bfloat16)
    assert predictions(get_task("rte"), logits).tolist() == [1, 0]
    assert predictions(get_task("stsb"), torch.tensor([[1.5], [2.5]])).tolist() == [1.5, 2.5]
    assert get_task("mrpc").main_score({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    mnli = {"matched_accuracy": 0.8, "mismatched_accuracy": 0.7}
    assert get_task("mnli").main_score(mnli) == pytest.approx(0.75)


@pytest.mark.parametrize("constant", [0, 1])
def test_constant_predictions_give_zero_matthews(constant):
    """sklearn/GLUE give 0; plain torchmetrics gives +-0.0256 for CoLA dev's 721/322 labels."""
    metrics = build_metrics(get_task("cola"))
    labels = torch.tensor([1] * 721 + [0] * 322)
    metrics.update(torch.full_like(labels, constant), labels)
    assert compute(metrics) == {"mcc": 0.0}
