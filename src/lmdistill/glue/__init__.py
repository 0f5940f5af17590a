"""GLUE fine-tuning: task specs, TSV readers, DataModule, metrics, classifier, sweep reports."""

from lmdistill.glue.tasks import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskSpec", "get_task"]
