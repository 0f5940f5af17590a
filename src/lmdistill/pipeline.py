"""The distillation pipeline below the entry point (`lmdistill-distill`, and the teacher assistant's
chain in `lmdistill.assistant`): build teacher, student and method from their configs, fit,
export the student, write summary.json.

`run` is one configuration from start to end; its steps (`open_checkpoint`, `build`, `fit`,
`export_and_summarize`) are what the teacher assistant's run is made of too.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmdistill import __version__
from lmdistill.config_checks import check_config
from lmdistill.distributed import is_first_rank
from lmdistill.errors import UserError
from lmdistill.hardware import compile_backend, enable_tf32, resolve_precision
from lmdistill.io import check_checkpoint_matches, load_checkpoint, write_json_atomic
from lmdistill.models import export_student
from lmdistill.models.describe import describe_student
from lmdistill.models.teacher import quiet_transformers
from lmdistill.resume import (
    RecordConfig,
    Resume,
    check_resume,
    checkpoint_wandb_run_id,
    report_finished,
)
from lmdistill.runs import (
    config_key,
    handed_to_launched_ranks,
    record_run,
    resolve_ckpt_path,
    write_job_record,
)
from lmdistill.safe_stop import EXIT_SIGNALLED, CheckpointOnStop
from lmdistill.tracking import make_loggers

log = logging.getLogger("lmdistill")


# keys of the teacher and student groups that only interpolations read, not their builders
_NOT_FOR_BUILDERS = {
    "teacher": ("relation_heads", "minilm_v2_layer"),  # methods' R; teacher.layer's default
    "student": ("relation_site",),  # read by methods
}


def _builder(cfg: DictConfig, group: str) -> DictConfig:
    """The group's node without the keys only interpolations read: what its `_target_` receives."""
    node = OmegaConf.to_container(cfg[group], resolve=True)
    return OmegaConf.create({k: v for k, v in node.items() if k not in _NOT_FOR_BUILDERS[group]})


def build_method(cfg: DictConfig, precision: str, teacher=None):
    """Teacher, student and method from their groups' `_target_`s; then the method freezes what
    its loss cannot reach. `teacher`: a `Teacher` built already (the teacher assistant's), in
    place of the `teacher` group's."""
    # objects are passed to partials (Hydra would copy keyword arguments into a config)
    if teacher is None:
        teacher = instantiate(_builder(cfg, "teacher"), precision=precision)
    student = instantiate(_builder(cfg, "student"), _partial_=True, _convert_="all")(
        teacher=teacher
    )
    method = instantiate(cfg.method, _partial_=True, _convert_="all")
    method = method(teacher=teacher, student=student, optim=OmegaConf.to_container(cfg.optim))
    method.freeze_unreached()
    return method


def build(cfg: DictConfig, make_module=build_method, checkpoint: dict | None = None):
    """Instantiate (module, datamodule, trainer) from a composed config; the module is
    `make_module(cfg, precision)` (a method, or the teacher assistant's chain). Resuming
    `checkpoint`, the W&B logger continues the checkpoint's W&B run."""
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    enable_tf32(cfg.tf32)
    module = make_module(cfg, precision)
    backend = compile_backend(cfg.compile)
    if backend is not None:
        module.compile_models(backend)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")  # bad data paths or an empty corpus fail before anything is written
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = make_loggers(cfg.logger, checkpoint_wandb_run_id(checkpoint)) or False
    trainer = instantiate(
        cfg.trainer, precision=precision, callbacks=callbacks, logger=loggers,
        default_root_dir=cfg.paths.output_dir,
    )  # fmt: skip
    return module, datamodule, trainer


def summarize(
    cfg: DictConfig, module, trainer, export_dir: Path | None, method: str | None = None
) -> dict:
    """The run's summary.json (DESIGN.md contract); method settings from `summary_fields`.
    `method`: the method's name (default: the `method=` choice of the job)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        "method": method or choices.get("method", cfg.method._target_.rsplit(".", 1)[-1]),
        "teacher": {
            "name_or_path": cfg.teacher.name_or_path,
            "layer": module.teacher.layer,
            "hidden_size": module.teacher.hidden_size,
        },  # fmt: skip
        "student": {**describe_student(module.student, 128), **student_init(cfg)},
        "steps": trainer.global_step,
        "tokens_seen": module.tokens_seen,
        "loss_first": module.loss_first,
        "final_loss": module.final_loss,  # mean of the last 10 batches
        "tokens_per_second": round(module.tokens_per_second, 1),
        "global_batch_size": cfg.data.batch_size
        * trainer.accumulate_grad_batches
        * trainer.world_size,
        "precision": str(trainer.precision),
        **module.summary_fields(),
        "seed": cfg.seed,
        "export_dir": str(export_dir) if export_dir else None,
        "lmdistill_version": __version__,
    }


def run(cfg: DictConfig) -> dict:
    """Distil, export and summarise one configuration; returns the summary.

    A resumed run must have the checkpoint's config except where `resume.allow` says otherwise,
    and a finished run is reported, not trained again (`lmdistill.resume`).
    """
    check_config(cfg)  # seed=abc, optim.lr=-1, ...: one line before anything is built or written
    export_dir = Path(cfg.paths.output_dir) / "student" if cfg.export else None
    key = config_key(cfg)
    ckpt_path = resolve_ckpt_path(cfg, key)
    checkpoint, resume, finished = open_checkpoint(cfg, ckpt_path, export_dir)
    if finished is not None:
        return report_finished(finished) if is_first_rank() else {}
    module, datamodule, trainer = build(cfg, checkpoint=checkpoint)
    if checkpoint is not None:
        check_resumed_module(checkpoint, module, trainer, ckpt_path)
        del checkpoint
    resumes = fit(cfg, key, module, datamodule, trainer, ckpt_path, resume)
    summary = (
        export_and_summarize(cfg, module, trainer, export_dir, resumes)
        if trainer.is_global_zero
        else {}
    )
    trainer.strategy.barrier("lmdistill.export")  # every rank may use the export from here on
    return summary


def open_checkpoint(cfg: DictConfig, ckpt_path: str | None, export_dir: Path | None,
                    view=None) -> tuple[dict | None, Resume | None, Path | None]:  # fmt: skip
    """Seed, then load and check the checkpoint to resume (before anything is built: one line,
    no Lightning banner). Returns (checkpoint, resume record, finished run's summary.json); all
    None for a fresh run. `view(checkpoint)`: the checkpoint as `check_resume` judges it."""
    out_dir = Path(cfg.paths.output_dir)
    if ckpt_path is None:
        check_fresh_output(out_dir, export_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # no "Seed set" line on stderr
    if ckpt_path is None:
        return None, None, None
    checkpoint = load_checkpoint(ckpt_path)
    check_world_size(checkpoint, configured_world_size(cfg), ckpt_path)
    resume, finished = check_resume(view(checkpoint) if view else checkpoint, cfg, ckpt_path)
    if finished is None:
        check_fresh_output(out_dir, export_dir, resuming=True)
    return checkpoint, resume, finished


def check_resumed_module(checkpoint: dict, module, trainer, ckpt_path: str) -> None:
    """The checkpoint fits the built module and this run's rank count."""
    check_checkpoint_matches(checkpoint, module, ckpt_path)
    check_world_size(checkpoint, trainer.world_size, ckpt_path)


def resume_records(resume: Resume | None) -> list[dict]:
    """The checkpoints this training went through (recorded in summary and provenance)."""
    return [*resume.history, resume.record()] if resume is not None else []


def fit(cfg: DictConfig, key: str, module, datamodule, trainer, ckpt_path: str | None,
        resume: Resume | None) -> list[dict]:  # fmt: skip
    """Record the run, fit (from `ckpt_path`), write the final last.ckpt; returns the resume
    records. A signal stops training with a checkpoint and exits (`safe_stop`)."""
    out_dir = Path(cfg.paths.output_dir)
    trainer.callbacks.append(RecordConfig(cfg, resume))  # the config goes into every checkpoint
    resumes = resume_records(resume)
    log.info(
        "rank %d of %d: config %s, pid %d on %s, CUDA_VISIBLE_DEVICES=%s, resuming from %s",
        trainer.global_rank, trainer.world_size, key, os.getpid(), socket.gethostname(),
        os.environ.get("CUDA_VISIBLE_DEVICES", ""), ckpt_path,
    )  # fmt: skip
    write_job_record()  # .hydra/ (or .hydra/resume-<n>/): only now, never over an earlier run's
    record_run(cfg.paths.cache_dir, key, out_dir)  # `ckpt_path=last` of a later run finds it
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "resumes": resumes})
    try:  # the job's W&B run stays open for its GLUE scores: `distill.main` closes it
        with handed_to_launched_ranks(key, out_dir, ckpt_path):  # DDP ranks resume alike
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        _exit_after_signal(trainer)
    final = out_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final, weights_only=False)  # the full final state
    return resumes


def check_fresh_output(out_dir: Path, export_dir: Path | None, resuming: bool = False) -> None:
    """Nothing of an earlier run in `out_dir` is overwritten: no export (student/, subnets/),
    no summary."""
    for earlier in (export_dir, out_dir / "subnets" if export_dir is not None else None):
        if earlier is not None and earlier.exists():
            raise UserError(f"{earlier} already exists; run in a fresh output directory")
    summary = out_dir / "summary.json"
    if resuming and summary.exists():
        raise UserError(f"{summary} already exists; run in a fresh output directory")


def export_and_summarize(
    cfg: DictConfig, module, trainer, export_dir: Path | None, resumes: list[dict],
    method: str | None = None, extra: dict | None = None,
) -> dict:  # fmt: skip
    """Rank 0: export the student, write summary.json into `paths.output_dir`; returns the
    summary.

    `resumes`: the checkpoints this training went through, with the config changes allowed at
    each (`resume.allow`); recorded in both. `method`: the method's name in the summary (default:
    the job's `method=` choice); `extra`: further summary keys (the teacher assistant's entry).
    """
    out_dir = Path(cfg.paths.output_dir)
    extras = {}
    if export_dir is not None:
        with quiet_transformers():
            record = {**provenance(cfg, module, trainer), "resumes": resumes}
            export_student(module.student, cfg.data.tokenizer, export_dir, record)
            extras = module.export_extras(out_dir, cfg.data.tokenizer, record)  # ofa.export
    summary = {**summarize(cfg, module, trainer, export_dir, method), **extras,
               "resumes": resumes, **(extra or {})}  # fmt: skip
    write_json_atomic(out_dir / "summary.json", summary)
    log.info(
        "loss %.4f -> %.4f over %d steps; student: %s; summary: %s",
        summary["loss_first"] or float("nan"), summary["final_loss"] or float("nan"),
        summary["steps"], export_dir, out_dir / "summary.json",
    )  # fmt: skip
    return summary


def check_world_size(checkpoint: dict, world_size: int | None, path: str) -> None:
    """Each rank's data position and RNG are in the checkpoint: the rank count must not change.

    `world_size`: this run's rank count; None where it is not known yet (nothing checked).
    """
    written_by = int(checkpoint.get("lmdistill", {}).get("world_size", 1))
    if world_size is not None and written_by != world_size:
        raise UserError(
            f"checkpoint {path} was written by {written_by} process(es) but this run has "
            f"{world_size}; resume with trainer.devices x trainer.num_nodes = {written_by}"
        )


def configured_world_size(cfg: DictConfig) -> int | None:
    """The rank count the config asks for, where it says it plainly (devices: 2, or [0, 1])."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(nodes, int) or isinstance(devices, bool):
        return None
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, ListConfig)):
        return len(devices) * nodes
    return None  # "auto", -1: known once the Trainer exists


def _exit_after_signal(trainer) -> None:
    """SIGTERM (or a pre-emption signal) stopped training and last.ckpt is written: exit."""
    for callback in trainer.callbacks:
        if isinstance(callback, CheckpointOnStop):
            callback.run_previous_handler()  # submitit: requeue this job (and exit)
    raise SystemExit(EXIT_SIGNALLED)


def student_init(cfg: DictConfig) -> dict:
    """`student.init_from_teacher` as the run used it; none for a sparse student (the teacher
    itself, sliced: summary.json's `sparse_student`)."""
    if "init_from_teacher" not in cfg.student or cfg.student._target_.endswith(".sparse_student"):
        return {}
    return {"init_from_teacher": cfg.student.init_from_teacher}


def provenance(cfg: DictConfig, module, trainer) -> dict:
    """Where the exported student came from."""
    data = {k: cfg.data.get(k) for k in ("source", "paths", "hf_path", "hf_name", "max_seq_length")}
    return {
        "lmdistill_version": __version__,
        "teacher": cfg.teacher.name_or_path,
        "teacher_layer": module.teacher.layer,
        "method": cfg.method._target_,
        **student_init(cfg),
        **module.summary_fields(),
        "untrained_parameters": module.frozen_parameters,
        "data": {
            **OmegaConf.to_container(OmegaConf.create(data), resolve=True),
            **(record() if (record := getattr(trainer.datamodule, "corpus_record", None)) else {}),
        },
        "steps": trainer.global_step,
        "tokens_seen": module.tokens_seen,
        "seed": cfg.seed,
    }
