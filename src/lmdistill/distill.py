"""lmdistill-distill: distil a teacher into a student, export it, write summary.json.

    lmdistill-distill teacher=minilm-l6-local student=L3-H384 method=minilm_v2 trainer.max_steps=300
    lmdistill-distill -m student=L3-H384,L4-H384 method=minilm_v1,minilm_v2

Composes the config, instantiates teacher, student, method and data, fits with Lightning,
exports the student and writes the summary. Everything else lives in the objects it builds.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmdistill import __version__
from lmdistill.config_checks import check_config
from lmdistill.distributed import is_first_rank, job_scope
from lmdistill.errors import UserError, report_user_errors
from lmdistill.hardware import compile_backend, enable_tf32, resolve_precision
from lmdistill.io import check_checkpoint_matches, load_checkpoint, write_json_atomic
from lmdistill.models import build_student, export_student, load_teacher
from lmdistill.models.teacher import quiet_transformers
from lmdistill.resources import CONF_DIR, register_resolvers
from lmdistill.resume import RecordConfig, check_resume, report_finished
from lmdistill.runs import (
    config_key,
    record_run,
    remember_job,
    resolve_ckpt_path,
    write_job_record,
)
from lmdistill.safe_stop import EXIT_SIGNALLED, CheckpointOnStop
from lmdistill.tracking import finish_wandb

log = logging.getLogger("lmdistill")
register_resolvers()
# Deprecation notices raised inside torchdata and Lightning themselves; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def teacher_dtype(setting: str, precision: str) -> torch.dtype:
    """The teacher's weight dtype: `auto` follows the training precision."""
    if setting != "auto":
        if setting not in ("float32", "bfloat16", "float16"):
            raise UserError(
                f"unknown teacher.dtype '{setting}'; use auto, float32, bfloat16 or float16"
            )
        return getattr(torch, setting)
    if precision.startswith("bf16") or (
        precision.startswith("16") and not torch.cuda.is_available()
    ):
        return torch.bfloat16  # Lightning runs 16-mixed as bf16 on CPU
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def build(cfg: DictConfig):
    """Instantiate (module, datamodule, trainer) from a composed config."""
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    enable_tf32(cfg.tf32)
    if precision.startswith("16") and not torch.cuda.is_available():
        log.warning(
            "trainer.precision=16-mixed has no effect on CPU: Lightning runs it as bf16-mixed"
        )
    teacher = load_teacher(
        cfg.teacher.name_or_path,
        layer=cfg.method.get("teacher_layer"),
        revision=cfg.teacher.revision,
        trust_remote_code=cfg.teacher.trust_remote_code,
        dtype=teacher_dtype(cfg.teacher.dtype, precision),
    )
    shape = {
        k: v for k, v in cfg.student.items() if k not in ("relation_site", "init_from_teacher")
    }
    student = build_student(
        teacher.config,
        **shape,
        init_from_teacher=teacher.model if cfg.student.init_from_teacher else None,
    )
    method = instantiate(cfg.method, _partial_=True, _convert_="all")  # objects are passed below
    module = method(teacher=teacher, student=student, optim=OmegaConf.to_container(cfg.optim))
    backend = compile_backend(cfg.compile)
    if backend is not None:
        module.compile_models(backend)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")  # bad data paths or an empty corpus fail before anything is written
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.logger else False
    trainer = instantiate(
        cfg.trainer, precision=precision, callbacks=callbacks, logger=loggers,
        default_root_dir=cfg.paths.output_dir,
    )  # fmt: skip
    return module, datamodule, trainer


def summarize(cfg: DictConfig, module, trainer, export_dir: Path | None) -> dict:
    """The run's summary.json (DESIGN.md contract)."""
    student = module.student.config
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        "method": choices.get("method", cfg.method._target_.rsplit(".", 1)[-1]),
        "teacher": {
            "name_or_path": cfg.teacher.name_or_path,
            "layer": module.teacher.layer,
            "hidden_size": module.teacher.hidden_size,
        },  # fmt: skip
        "student": {
            "num_hidden_layers": student.num_hidden_layers,
            "hidden_size": student.hidden_size,
            "num_attention_heads": student.num_attention_heads,
            "intermediate_size": student.intermediate_size,
            "params": sum(p.numel() for p in module.student.parameters()),
            "gflops": module.student_gflops(128),
            "attention_experts": getattr(student, "attention_experts", 1),
            "ffn_experts": getattr(student, "ffn_experts", 1),
        },
        "steps": trainer.global_step,
        "tokens_seen": module.tokens_seen,
        "loss_first": module.loss_first,
        "final_loss": module.final_loss,  # mean of the last 10 batches
        "tokens_per_second": round(module.tokens_per_second, 1),
        "global_batch_size": cfg.data.batch_size
        * trainer.accumulate_grad_batches
        * trainer.world_size,
        "precision": str(trainer.precision),
        "reduction": getattr(module, "reduction", None),
        "relation_heads": getattr(module, "relation_heads", None),
        "relation_site": module.relation_site,
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
    out_dir = Path(cfg.paths.output_dir)
    export_dir = out_dir / "student" if cfg.export else None
    key = config_key(cfg)
    ckpt_path = resolve_ckpt_path(cfg, key)
    if ckpt_path is None:
        check_fresh_output(out_dir, export_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # no "Seed set" line on stderr
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
    resume = None
    if checkpoint is not None:  # before anything is built: one line, no Lightning banner
        check_world_size(checkpoint, configured_world_size(cfg), ckpt_path)
        resume, finished = check_resume(checkpoint, cfg, ckpt_path)
        if finished is not None:
            return report_finished(finished) if is_first_rank() else {}
        check_fresh_output(out_dir, export_dir, resuming=True)
    module, datamodule, trainer = build(cfg)
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, module, ckpt_path)
        check_world_size(checkpoint, trainer.world_size, ckpt_path)
        del checkpoint
    trainer.callbacks.append(RecordConfig(cfg, resume))  # the config goes into every checkpoint
    resumes = [*resume.history, resume.record()] if resume is not None else []
    log.info(
        "rank %d of %d: config %s, pid %d on %s, CUDA_VISIBLE_DEVICES=%s, resuming from %s",
        trainer.global_rank, trainer.world_size, key, os.getpid(), socket.gethostname(),
        os.environ.get("CUDA_VISIBLE_DEVICES", ""), ckpt_path,
    )  # fmt: skip
    write_job_record()  # .hydra/ (or .hydra/resume-<n>/): only now, never over an earlier run's
    record_run(cfg.paths.cache_dir, key, out_dir)  # `ckpt_path=last` of a later run finds it
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "resumes": resumes})
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:
            _exit_after_signal(trainer)
        final = out_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(final, weights_only=False)  # the full final state
    finally:
        finish_wandb(trainer)
    summary = (
        _export_and_summarize(cfg, module, trainer, export_dir, resumes)
        if trainer.is_global_zero
        else {}
    )
    trainer.strategy.barrier("lmdistill.export")  # every rank may use the export from here on
    return summary


def check_fresh_output(out_dir: Path, export_dir: Path | None, resuming: bool = False) -> None:
    """Nothing of an earlier run in `out_dir` is overwritten: no export, no summary."""
    if export_dir is not None and export_dir.exists():
        raise UserError(f"{export_dir} already exists; run in a fresh output directory")
    summary = out_dir / "summary.json"
    if resuming and summary.exists():
        raise UserError(f"{summary} already exists; run in a fresh output directory")


def _export_and_summarize(
    cfg: DictConfig, module, trainer, export_dir: Path | None, resumes: list[dict]
) -> dict:
    """Rank 0: export the student, write summary.json; returns the summary.

    `resumes`: the checkpoints this training went through, with the config changes allowed at
    each (`resume.allow`); recorded in both.
    """
    if export_dir is not None:
        with quiet_transformers():
            record = {**provenance(cfg, module, trainer), "resumes": resumes}
            export_student(module.student, cfg.data.tokenizer, export_dir, record)
    summary = {**summarize(cfg, module, trainer, export_dir), "resumes": resumes}
    out_dir = Path(cfg.paths.output_dir)
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


def provenance(cfg: DictConfig, module, trainer) -> dict:
    """Where the exported student came from."""
    data = {k: cfg.data.get(k) for k in ("source", "paths", "hf_path", "hf_name", "max_seq_length")}
    return {
        "lmdistill_version": __version__,
        "teacher": cfg.teacher.name_or_path,
        "teacher_layer": module.teacher.layer,
        "method": cfg.method._target_,
        "relation_heads": getattr(module, "relation_heads", None),
        "relation_site": module.relation_site,
        "reduction": getattr(module, "reduction", None),
        "untrained_parameters": module.frozen_parameters,
        "data": OmegaConf.to_container(OmegaConf.create(data), resolve=True),
        "steps": trainer.global_step,
        "tokens_seen": module.tokens_seen,
        "seed": cfg.seed,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="distill")
@report_user_errors
def main(cfg: DictConfig) -> None:
    remember_job(cfg)  # its .hydra/ record is written once the checks pass (runs.write_job_record)
    with job_scope("lmdistill.distill"):  # the next job of a sweep starts with a clean process
        if cfg.method.get("assistant") is not None:
            from lmdistill.assistant import run_with_assistant

            run_with_assistant(cfg)
        else:
            run(cfg)


if __name__ == "__main__":
    main()
