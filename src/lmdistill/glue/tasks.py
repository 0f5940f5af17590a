"""What each GLUE task is: its files, columns, labels, dev splits and metrics.

One `TaskSpec` per task; everything else (readers, DataModule, metrics, report) reads it.
Label indices follow the Hugging Face `nyu-mll/glue` dataset, so a model fine-tuned from the
TSV files and one fine-tuned from the hub agree on what class 0 means.

Main score per task (the GLUE convention, used by the report): CoLA Matthews correlation,
STS-B mean of Pearson and Spearman, MRPC and QQP mean of F1 and accuracy, MNLI mean of matched
and mismatched accuracy, accuracy otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str  # config name: cola, sst2, ...
    glue_dir: str  # folder name in the original GLUE download: CoLA, SST-2, ...
    hf_fields: tuple[str, ...]  # text columns of nyu-mll/glue (one or two)
    tsv_text_columns: tuple[int, ...]  # the same texts' columns in the TSV files
    tsv_label_column: int  # negative counts from the end (STS-B, MNLI: the last column)
    tsv_columns: int | None  # exact column count of every row; None: at least enough for the above
    header: bool  # first line is a header (CoLA has none)
    labels: tuple[str, ...] | None  # TSV label strings in class-index order; None = regression
    metrics: tuple[str, ...]  # names in results.json, per dev split
    dev_splits: tuple[tuple[str, str, str], ...] = (("dev", "dev", "validation"),)
    # (split name, TSV file stem, HF split) for every dev set; MNLI has two

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def is_pair(self) -> bool:
        return len(self.hf_fields) == 2

    def metric_names(self) -> list[str]:
        """Names of the metrics in results.json: `accuracy`, or `matched_accuracy` for MNLI."""
        if len(self.dev_splits) == 1:
            return list(self.metrics)
        return [f"{split}_{m}" for split, _, _ in self.dev_splits for m in self.metrics]

    def main_score(self, metrics: dict[str, float]) -> float:
        """The task's single GLUE score: the mean of all its metrics (see the module docstring)."""
        values = [metrics[name] for name in self.metric_names()]
        return sum(values) / len(values)


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", "CoLA", ("sentence",), (3,), 1, 4, False, ("0", "1"), ("mcc",)),
        TaskSpec("sst2", "SST-2", ("sentence",), (0,), 1, 2, True, ("0", "1"), ("accuracy",)),
        TaskSpec(
            "mrpc", "MRPC", ("sentence1", "sentence2"), (3, 4), 0, 5, True, ("0", "1"),
            ("f1", "accuracy"),
        ),
        TaskSpec(
            "stsb", "STS-B", ("sentence1", "sentence2"), (7, 8), -1, 10, True, None,
            ("pearson", "spearman"),
        ),
        TaskSpec(
            "qqp", "QQP", ("question1", "question2"), (3, 4), 5, 6, True, ("0", "1"),
            ("f1", "accuracy"),
        ),
        TaskSpec(
            "mnli", "MNLI", ("premise", "hypothesis"), (8, 9), -1, None, True,
            ("entailment", "neutral", "contradiction"), ("accuracy",),
            dev_splits=(
                ("matched", "dev_matched", "validation_matched"),
                ("mismatched", "dev_mismatched", "validation_mismatched"),
            ),
        ),
        TaskSpec("qnli", "QNLI", ("question", "sentence"), (1, 2), 3, 4, True, _NLI2, ("accuracy",)),
        TaskSpec("rte", "RTE", ("sentence1", "sentence2"), (1, 2), 3, 4, True, _NLI2, ("accuracy",)),
        TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), (1, 2), 3, 4, True, ("0", "1"), ("accuracy",)),
    )
}  # fmt: skip


def get_task(name: str) -> TaskSpec:
    """The spec of task `name` (case-insensitive; `sst-2` and `sts-b` accepted), or a UserError."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise UserError(f"unknown task '{name}'; use one of {', '.join(TASKS)}")
    return TASKS[key]
