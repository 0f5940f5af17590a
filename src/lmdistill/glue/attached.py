"""GLUE after distillation (`lmdistill-distill ... eval=glue`): fine-tune each exported student on
the chosen tasks over a small grid and write the scores into the run's summary.json.

    <run>/eval/<task>/lr<lr>-ep<epochs>-seed<seed>/   results.json, logs/metrics.csv (the student)
    <run>/eval/assistant/<task>/...                    the teacher assistant (assistant=...)
    summary.json  glue: {<task>: {score, metric, lr, epochs, seed, metrics, grid}, average}
                  assistant.glue: the same for the assistant

A task's score is the best dev score over the grid (a point's score: its best or last epoch,
`eval.select`); `grid` keeps every point's. A task that an earlier `eval.tasks` of this run
evaluated the same export on (re-run in place) stays in `glue` with the points on disk
(`finished_finetune` accepts them: this export's, not older than it). Runs on the global-zero
rank after the export, in the job's own process (a sweep job fine-tunes on its own GPU), on the
distillation's accelerator with one device. A point whose results.json holds the same settings
is read, not trained again (a restarted job resumes its evaluation); one holding other settings,
or older than the model, is refused, never overwritten. The scores also go into the summary of
the job's W&B run, if it logs to one (`wandb_scores`; a finished run re-run resumes its earlier
W&B run for them).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmdistill.errors import UserError
from lmdistill.finetune import FinetuneSettings, finetune, finished_finetune
from lmdistill.glue.tasks import TASKS, TaskSpec, get_task
from lmdistill.hardware import resolve_precision
from lmdistill.io import write_json_atomic
from lmdistill.tracking import open_job_wandb_run, update_wandb_summary

log = logging.getLogger("lmdistill")

EVAL_DIR = "eval"
ASSISTANT_DIR = "assistant"


def evaluate_run(cfg: DictConfig, summary: dict) -> dict:
    """Fine-tune the run's student (and its teacher assistant) on `cfg.eval`'s GLUE grid; adds
    `glue` (and `assistant.glue`) to `summary`, rewrites `<run>/summary.json` (`owning_run`);
    returns `summary`."""
    out_dir = owning_run(cfg, summary)
    models = [("student", summary, out_dir / EVAL_DIR)]
    assistant = summary.get("assistant")
    if isinstance(assistant, dict) and assistant.get("export_dir"):
        models.append(("assistant", assistant, out_dir / EVAL_DIR / ASSISTANT_DIR))
    for name, entry, eval_dir in models:
        entry["glue"] = evaluate_model(cfg, entry["export_dir"], eval_dir, out_dir)
        log.info("GLUE dev of the %s, best of each task's grid: %s", name,
                 _scores_line(entry["glue"]))  # fmt: skip
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("GLUE scores written to %s", out_dir / "summary.json")
    open_job_wandb_run(cfg.get("logger"), out_dir)  # a finished run re-run: its earlier W&B run
    update_wandb_summary(wandb_scores(summary))
    return summary


def owning_run(cfg: DictConfig, summary: dict) -> Path:
    """The run directory `summary` belongs to: the job's own, or a finished run that
    `ckpt_path=last` (or a checkpoint path) found elsewhere, whose export `<run>/student` lies
    beside its summary.json: its grid points are there, and its summary is the student's record."""
    own, export = Path(cfg.paths.output_dir), Path(summary["export_dir"])
    run = export.parent
    if export.name == "student" and (run / "summary.json").is_file():
        if run.resolve() != own.resolve():
            log.info("evaluating the finished run %s in its own directory", run)
            return run
    return own


def wandb_scores(summary: dict) -> dict:
    """`glue/<task>` and `glue/average` (dev scores, fractions), `assistant/glue/...` for a
    teacher assistant: the summary keys of the job's W&B run."""
    scores = {f"glue/{task}": v if task == "average" else v["score"]
              for task, v in summary["glue"].items()}  # fmt: skip
    assistant = summary.get("assistant")
    if isinstance(assistant, dict) and "glue" in assistant:
        scores.update({f"assistant/{k}": v for k, v in wandb_scores(assistant).items()})
    return scores


def grid_points(ev: DictConfig) -> list[tuple[float, int, int]]:
    """(lr, epochs, seed) of every point of the grid, each once, in config order."""
    lrs, epochs, seeds = (_items(ev[k]) for k in ("lrs", "epochs", "seeds"))
    points = [(float(a), int(b), int(c)) for a, b, c in itertools.product(lrs, epochs, seeds)]
    return list(dict.fromkeys(points))


def evaluate_model(cfg: DictConfig, model_dir: str, eval_dir: Path, run_dir: Path) -> dict:
    """{task: {score, metric, lr, epochs, seed, metrics, grid}, "average": mean score} for one
    model: the tasks of `eval.tasks`, then those an earlier run evaluated it on
    (`earlier_tasks`); scores are fractions, as in results.json."""
    scores: dict = {}
    for task in tasks_of(cfg.eval):
        grid = []
        for lr, epochs, seed in grid_points(cfg.eval):
            settings = replace(base_settings(cfg, model_dir, task), lr=lr, epochs=epochs, seed=seed)
            point_dir = eval_dir / task.name / f"lr{lr:g}-ep{epochs}-seed{seed}"
            results = finished_point(point_dir, settings)
            if results is None:
                with _quiet_lightning():
                    make_trainer = _trainer_factory(cfg, point_dir, epochs)
                    results = finetune(settings, point_dir, make_trainer)
            grid.append(_grid_entry(settings, results, point_dir, run_dir))
        scores[task.name] = _task_entry(task, grid)
    scores.update(earlier_tasks(model_dir, eval_dir, run_dir, skip=set(scores)))
    task_scores = [v["score"] for v in scores.values()]
    scores["average"] = sum(task_scores) / len(task_scores)
    return scores


def earlier_tasks(model_dir: str, eval_dir: Path, run_dir: Path, skip: set[str]) -> dict:
    """{task: entry} of the tasks outside `skip` that an earlier run evaluated `model_dir` on:
    the points under `eval_dir`/<task>/ that `finished_finetune` accepts with their own settings
    (this export's, not older than it); any other point is left out with a warning."""
    scores = {}
    for name, task in TASKS.items():
        grid = []
        for path in [] if name in skip else sorted((eval_dir / name).glob("*/results.json")):
            settings = _recorded_settings(path)
            try:
                if settings is None or settings.model != str(model_dir):
                    raise UserError(f"{path} is not a fine-tune of {model_dir}")
                results = finished_finetune(path.parent, settings, "remove it")
            except UserError as err:
                log.warning("left out of summary.json's glue: %s", err)
                continue
            grid.append(_grid_entry(settings, results, path.parent, run_dir))
        if grid:
            scores[name] = _task_entry(task, grid)
    return scores


def _recorded_settings(path: Path) -> FinetuneSettings | None:
    """The settings a results.json records, or None when it records none readable."""
    try:
        return FinetuneSettings(**json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _grid_entry(settings: FinetuneSettings, results: dict, point_dir: Path, run_dir: Path) -> dict:
    """One point of a task's `grid`: its settings, score and where its results.json is."""
    return {
        "lr": settings.lr, "epochs": settings.epochs, "seed": settings.seed,
        "score": results["score"], "metrics": results["metrics"], "epoch": results["epoch"],
        "results": str((point_dir / "results.json").relative_to(run_dir)),
    }  # fmt: skip


def _task_entry(task: TaskSpec, grid: list[dict]) -> dict:
    """A task's entry: the best point's score and settings (the first of equal scores), and
    the whole `grid`."""
    best = max(grid, key=lambda point: point["score"])
    return {
        "score": best["score"], "metric": metric_name(task),
        **{k: best[k] for k in ("lr", "epochs", "seed", "metrics")}, "grid": grid,
    }  # fmt: skip


def tasks_of(ev: DictConfig) -> list[TaskSpec]:
    """The tasks of `eval.tasks`, each once, in the order given."""
    found = [get_task(str(name)) for name in _items(ev.tasks)]
    return list({t.name: t for t in found}.values())


def base_settings(cfg: DictConfig, model_dir: str, task: TaskSpec) -> FinetuneSettings:
    """The settings every grid point of `task` shares (lr, epochs and seed set per point)."""
    ev = cfg.eval
    return FinetuneSettings(
        model=str(model_dir), task=task.name, batch_size=int(ev.batch_size),
        weight_decay=float(ev.weight_decay), warmup_ratio=float(ev.warmup_ratio),
        select=str(ev.select), glue_dir=_optional_str(ev.glue_dir), hf_path=str(ev.hf_path),
        max_seq_length=int(ev.max_seq_length), eval_batch_size=int(ev.eval_batch_size),
        train_limit=None if ev.train_limit is None else int(ev.train_limit),
    )  # fmt: skip


def finished_point(point_dir: Path, settings: FinetuneSettings) -> dict | None:
    """`finished_finetune` of a grid point (its results.json when it holds exactly `settings`)."""
    return finished_finetune(
        point_dir, settings, "run in a fresh output directory, or keep eval.* and the student as "
        "they were",
    )  # fmt: skip


def metric_name(task: TaskSpec) -> str:
    """What the task's score is: `accuracy`, or `mean of f1 and accuracy`."""
    names = task.metric_names()
    return names[0] if len(names) == 1 else "mean of " + " and ".join(names)


def _trainer_factory(cfg: DictConfig, point_dir: Path, epochs: int):
    """A one-device Trainer on the distillation's accelerator, logging to `point_dir`/logs."""
    accelerator = str(cfg.trainer.accelerator)
    precision = resolve_precision(str(cfg.eval.precision), accelerator, "eval.precision")

    def make_trainer() -> L.Trainer:
        gc.collect()  # the distillation's models are gone: give their memory back first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return L.Trainer(
            accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs,
            max_steps=-1, gradient_clip_val=1.0, log_every_n_steps=10,
            logger=CSVLogger(str(point_dir), name="logs", version=""),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(point_dir),
            plugins=[LightningEnvironment()],  # one process: not the job's SLURM/torchrun ranks
        )  # fmt: skip

    return make_trainer


@contextlib.contextmanager
def _quiet_lightning():
    """Without Lightning's banners (devices, tips, "fit stopped", a short epoch's logging
    interval) for each point of the grid."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")  # after DDP: one device
            yield
    finally:
        logger.setLevel(level)


def _items(value) -> list:
    """A list's items; a single value (`eval.tasks=rte`) is a list of one."""
    if isinstance(value, ListConfig):
        return list(OmegaConf.to_container(value, resolve=True))
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _optional_str(value) -> str | None:
    return None if value is None else str(Path(str(value)).expanduser().resolve())


def _scores_line(glue: dict) -> str:
    parts = [f"{task} {v['score'] * 100:.1f}" for task, v in glue.items() if task != "average"]
    return ", ".join([*parts, f"average {glue['average'] * 100:.1f}"])
