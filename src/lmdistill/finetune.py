"""lmdistill-finetune: fine-tune a model on one GLUE task, write results.json.

    lmdistill-finetune task=rte model=outputs/<run>/student data.glue_dir=../shared/data/glue
    lmdistill-finetune task=sst2 model=minilm-l6-local init=random data.train_limit=5000
    lmdistill-finetune -m +grid=paper task=rte model=<student dir>

Composes the config and hands one `FinetuneSettings` to `finetune()`, which loads the model with a
task head, builds the GLUE data, fits with Lightning (dev evaluation every epoch, and where
training stops) and writes results.json. `finetune()` needs no Hydra: `lmdistill-distill
eval=glue` calls it in-process (lmdistill.glue.attached). Everything else lives in lmdistill.glue.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

import lmdistill  # noqa: F401 - registers lmdistill's model classes (MoE students) with transformers
from lmdistill import __version__
from lmdistill.config_checks import check_config
from lmdistill.distributed import job_scope
from lmdistill.errors import UserError, report_user_errors
from lmdistill.glue import get_task
from lmdistill.glue.classifier import GlueClassifier, load_classifier
from lmdistill.glue.datamodule import GlueDataModule
from lmdistill.hardware import resolve_precision
from lmdistill.hydra_errors import report_hydra_errors
from lmdistill.io import write_json_atomic
from lmdistill.models.describe import student_gflops
from lmdistill.models.teacher import quiet_transformers
from lmdistill.resources import CONF_DIR, register_resolvers
from lmdistill.runs import remember_job, write_job_record
from lmdistill.tracking import finish_wandb

log = logging.getLogger("lmdistill")
register_resolvers()
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def resolve_model(cfg: DictConfig) -> str:
    """The model's directory or hub name: a shortcut (`minilm-l6-local`), a path, or a hub name.

    Only the chosen shortcut is resolved: the others may need packages (the offline teacher)
    that a user fine-tuning their own students never installs.
    """
    name = str(cfg.model)
    if name in cfg.model_shortcuts:
        return str(cfg.model_shortcuts[name])  # resolves this entry only
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def model_shape(model) -> dict:
    """The encoder's shape, parameters (without the task head) and GFLOPs per 128 tokens."""
    config = model.config
    shape = {
        k: getattr(config, k, None)
        for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    }
    shape["params"] = sum(p.numel() for p in model.base_model.parameters())
    if None not in shape.values():
        shape["gflops"] = round(student_gflops(model, 128), 4)  # MiniMoE and sparse included
    return shape


def hyperparameters(cfg: DictConfig, model_path: str) -> dict:
    """The resolved config for the loggers, with the chosen model's path instead of the table of
    shortcuts (resolving every shortcut would need every shortcut's package)."""
    without = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "model_shortcuts"])
    return {**OmegaConf.to_container(without, resolve=True), "model_path": model_path}


def fit_and_evaluate(trainer, module: GlueClassifier, datamodule: GlueDataModule) -> None:
    """Fit, then evaluate on dev if the last optimizer step was not evaluated yet: training that
    stops mid-epoch (trainer.max_steps, max_time, a callback) is evaluated where it stopped."""
    trainer.fit(module, datamodule=datamodule)
    if not module.history or module.history[-1]["step"] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides one fine-tune's result: model, task, data and optimisation.

    Recorded in results.json (`settings`); lmdistill.glue.attached compares it to tell a finished
    grid point from one of other settings.
    """

    model: str  # model directory or hub name (resolved: no shortcuts)
    task: str  # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli
    init: str = "pretrained"  # pretrained | random
    lr: float = 2e-5
    batch_size: int = 32
    epochs: int = 3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    select: str = "best"  # best | last dev epoch
    seed: int = 42
    glue_dir: str | None = None  # folder of GLUE TSV files; None = the hub (hf_path)
    hf_path: str = "nyu-mll/glue"
    max_seq_length: int = 128
    eval_batch_size: int = 128
    train_limit: int | None = None
    num_workers: int = 0
    revision: str | None = None
    trust_remote_code: bool = False

    def data(self) -> dict:
        """The GlueDataModule's keyword arguments (besides task, tokenizer, batch size, seed)."""
        keys = ("glue_dir", "hf_path", "max_seq_length", "eval_batch_size", "train_limit",
                "num_workers")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def finetune(
    settings: FinetuneSettings,
    out_dir: str | Path,
    make_trainer: Callable[[], L.Trainer],
    model_name: str | None = None,
    hyperparameters: dict | None = None,
) -> dict:
    """Fine-tune `settings.model` on `settings.task`, evaluate on dev; write and return
    results.json in `out_dir` (the global-zero rank; {} elsewhere). No Hydra: callable in-process.

    make_trainer: builds the Lightning Trainer (max_epochs = settings.epochs), called once the
    model and data are loaded; hyperparameters: what its loggers get (default: the settings).
    """
    task = get_task(settings.task)
    out_dir = Path(out_dir)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    model = load_classifier(
        settings.model, task, settings.init, revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )  # fmt: skip
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(
            settings.model, revision=settings.revision,
            trust_remote_code=settings.trust_remote_code,
        )  # fmt: skip
    datamodule = GlueDataModule(
        task, tokenizer, batch_size=settings.batch_size, seed=settings.seed, **settings.data()
    )
    datamodule.setup("fit")  # bad or missing files fail before training starts
    module = GlueClassifier(
        model, task, lr=settings.lr, weight_decay=settings.weight_decay,
        warmup_ratio=settings.warmup_ratio,
    )  # fmt: skip
    trainer = make_trainer()
    for logger in trainer.loggers:
        logger.log_hyperparams(hyperparameters or asdict(settings))
    try:
        fit_and_evaluate(trainer, module, datamodule)
    finally:
        finish_wandb(trainer)
    if not trainer.is_global_zero:
        return {}
    chosen = module.results(settings.select)
    results = {
        "task": task.name,
        "model": settings.model,
        "model_name": model_name or settings.model,
        "init": settings.init,
        "metrics": chosen["metrics"],  # fractions (accuracy 0.71), correlations in [-1, 1]
        "score": chosen["score"],  # the task's main score (GLUE convention, lmdistill.glue.tasks)
        "select": settings.select,  # best: the best dev epoch; last: the last epoch
        "epoch": chosen["epoch"],  # 1-indexed epoch the metrics come from (as in history)
        "step": chosen["step"],  # optimizer steps trained when they were measured
        "steps": trainer.global_step,  # optimizer steps trained in all
        "epochs": settings.epochs,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "train_examples": len(datamodule.train),
        "dev_examples": {name: len(f) for name, f in datamodule.dev.items()},
        "history": module.history,
        "model_shape": model_shape(model),
        "precision": str(trainer.precision),
        "settings": asdict(settings),
        "lmdistill_version": __version__,
    }
    write_json_atomic(out_dir / "results.json", results)
    log.info(
        "%s dev (%s epoch %d): %s; results: %s", task.name, settings.select, results["epoch"],
        ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items()), out_dir / "results.json",
    )  # fmt: skip
    return results


def settings_from_config(cfg: DictConfig, model_path: str) -> FinetuneSettings:
    """lmdistill-finetune's config as the settings of one fine-tune."""
    data = cfg.data
    return FinetuneSettings(
        model=model_path, task=str(cfg.task), init=str(cfg.init), lr=cfg.lr,
        batch_size=cfg.batch_size, epochs=cfg.epochs, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio, select=str(cfg.select), seed=cfg.seed,
        glue_dir=data.glue_dir, hf_path=str(data.hf_path), max_seq_length=data.max_seq_length,
        eval_batch_size=data.eval_batch_size, train_limit=data.train_limit,
        num_workers=data.num_workers, revision=cfg.revision,
        trust_remote_code=bool(cfg.trust_remote_code),
    )  # fmt: skip


def run(cfg: DictConfig) -> dict:
    """Fine-tune and evaluate one configuration; returns (and writes) results.json."""
    check_config(cfg)  # lr=-1, batch_size=0, seed=abc, ...: one line before anything is loaded
    get_task(str(cfg.task))
    if cfg.data.glue_dir is not None and not Path(cfg.data.glue_dir).expanduser().is_dir():
        raise UserError(
            f"data.glue_dir {cfg.data.glue_dir} does not exist; point it at a folder of GLUE "
            "TSV files (CoLA/, RTE/, ...) or set data.glue_dir=null to use the hub"
        )
    out_dir = Path(cfg.paths.output_dir)
    model_path = resolve_model(cfg)
    settings = settings_from_config(cfg, model_path)
    earlier = finished_finetune(out_dir, settings, "give this one its own hydra.run.dir")
    if earlier is not None:
        return earlier
    write_job_record()  # .hydra/: only now, never over an earlier run's

    def make_trainer() -> L.Trainer:
        loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.logger else False
        precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
        return instantiate(
            cfg.trainer, precision=precision, logger=loggers, default_root_dir=str(out_dir)
        )

    return finetune(
        settings, out_dir, make_trainer, model_name=str(cfg.model),
        hyperparameters=hyperparameters(cfg, model_path),
    )  # fmt: skip


def finished_finetune(out_dir: Path, settings: FinetuneSettings, fix: str) -> dict | None:
    """The results.json of an earlier fine-tune of exactly `settings` in `out_dir` (it is not run
    again), else None (nothing there); a UserError ending in `fix` when it holds other settings,
    or is older than the model: an earlier fine-tune is never overwritten."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path} is not readable JSON ({err}); remove it to fine-tune again"
        ) from err
    recorded = results.get("settings") if isinstance(results, dict) else None
    expected = asdict(settings)
    if recorded != expected:
        differ = sorted(k for k in expected if (recorded or {}).get(k, "?") != expected[k])
        raise UserError(
            f"{path} holds a fine-tune with other settings ({', '.join(differ)}); {fix}"
        )
    if path.stat().st_mtime < _export_time(settings.model):
        raise UserError(
            f"{path} is older than the student it claims to evaluate ({settings.model}); run in "
            "a fresh output directory"
        )
    log.info("already fine-tuned: %s (score %.4f)", path, results["score"])
    return results


def _export_time(model_dir: str) -> float:
    """When the model directory's files were last written (0 for a hub name)."""
    files = [p for p in Path(model_dir).glob("*") if p.is_file()]
    return max((p.stat().st_mtime for p in files), default=0.0)


@report_hydra_errors
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
@report_user_errors
def main(cfg: DictConfig) -> None:
    remember_job(cfg)  # its .hydra/ record is written once the checks pass (runs.write_job_record)
    with job_scope(
        "lmdistill.finetune"
    ):  # DDP ranks re-run this job only; sweeps reset between jobs
        run(cfg)


if __name__ == "__main__":
    main()
