"""Teacher-assistant distillation: teacher -> assistant -> student in one fit (docs/methods.md
section 4), for any method: the `assistant` config group (null: no assistant).

    <run dir>/
      stage1_assistant -> <cache_dir>/assistants/<key>/   (student/, summary.json)
      checkpoints/last.ckpt   both stages: resumes exactly in either
      logs/                   both stages: assistant/train/loss, ... then train/loss, ...
      student/                the final student
      summary.json            the final student's, with an `assistant` entry

The run's module is a `TeacherAssistantChain` (lmdistill.methods.assistant_chain): stage 1 trains
the assistant for `assistant.max_steps` steps, then stage 2 the student for `trainer.max_steps`,
on one DataModule, with one optimizer, checkpoint, logger and W&B run. At the switch the assistant
is exported into a cache entry keyed by a hash of teacher, assistant shape, method, data,
optimizer, trainer and seed: any later run or sweep job with that assistant (also from another
run directory) starts in stage 2 with it as the teacher, and learns exactly what it would have
learnt after training the assistant itself. Jobs of a parallel sweep wait for the one that
trains a shared assistant (a file lock, held until its export). Re-running an interrupted
command (or `ckpt_path=last`) continues it in whichever stage it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig

from lmdistill.config_checks import check_config
from lmdistill.distributed import is_first_rank
from lmdistill.errors import UserError
from lmdistill.methods.assistant_chain import (
    CHAIN_KEY,
    StagedData,
    StageTrainer,
    TeacherAssistantChain,
    capture_rng,
    restore_rng,
)
from lmdistill.models.teacher import Teacher, teacher_dtype
from lmdistill.pipeline import (
    build,
    build_method,
    check_resumed_module,
    export_and_summarize,
    fit,
    open_checkpoint,
    resume_records,
)
from lmdistill.resources import CONF_DIR
from lmdistill.resume import check_allowed, config_differences, report_finished
from lmdistill.runs import (
    KEY_PARTS,
    config_key,
    handed_checkpoint,
    previous_checkpoint,
    resolve_ckpt_path,
)

log = logging.getLogger("lmdistill")

STAGE1_DIR = "stage1_assistant"
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
RUN_PARTS = (*KEY_PARTS, "assistant")  # what identifies a teacher-assistant run
PLAN_ENV = "LMDISTILL_ASSISTANT_PLAN"  # rank 0's plan, for the ranks it launches


@dataclass
class Plan:
    """Where the assistant comes from: trained in this run up to `switch_step`, or (0) the
    finished export in the cache entry."""

    cache_key: str
    entry: Path
    switch_step: int

    @property
    def export_dir(self) -> Path:
        return self.entry / "student"

    @property
    def trains_assistant(self) -> bool:
        return self.switch_step > 0


def run_with_assistant(cfg: DictConfig) -> dict:
    """Train (or take from the cache) the assistant, then the student, in one fit; export and
    summarise the student. Returns its summary (with an `assistant` entry); {} on other ranks."""
    check_config(cfg)
    _check_methods(cfg)
    _check_steps(cfg)
    out_dir = Path(cfg.paths.output_dir)
    export_dir = out_dir / "student" if cfg.export else None
    key = config_key(cfg, RUN_PARTS)
    handed = _handed_plan(key, out_dir)
    ckpt_path = _resolve_ckpt_path(cfg, key)
    view = functools.partial(_student_view, path=ckpt_path)
    checkpoint, resume, finished = open_checkpoint(cfg, ckpt_path, export_dir, view=view)
    recorded = None
    if checkpoint is not None:
        recorded = checkpoint[CHAIN_KEY]
        resume.step = int(checkpoint.get("global_step", 0))  # check_resume saw stage 2's steps
        _check_assistant_unchanged(recorded, cfg, ckpt_path, resume)
    if finished is not None:
        return report_finished(finished) if is_first_rank() else {}
    resumes = resume_records(resume)
    lock = _CacheLock(enabled=is_first_rank() and recorded is None and handed is None)
    with lock:
        plan = _plan(cfg, recorded, handed, lock)
        if is_first_rank() and not plan.trains_assistant:
            _link(out_dir / STAGE1_DIR, plan.entry)
        make_chain = lambda _, precision: build_chain(cfg, plan, precision)  # noqa: E731
        module, datamodule, trainer = build(_run_config(cfg, plan), make_chain, checkpoint)
        module.record = {"cache_key": plan.cache_key, "assistant": _assistant_settings(cfg)}
        module.on_switch = functools.partial(_export_assistant, cfg=cfg, plan=plan,
                                             resumes=resumes, lock=lock)  # fmt: skip
        if plan.trains_assistant:
            batches = plan.switch_step * trainer.accumulate_grad_batches
            datamodule = StagedData(datamodule, batches, module.start_stage2_rng)
        if checkpoint is not None:
            check_resumed_module(checkpoint, module, trainer, ckpt_path)
            del checkpoint
        os.environ[PLAN_ENV] = json.dumps({"run": key, "output_dir": str(out_dir),
                                           "switch_step": plan.switch_step,
                                           "cache_key": plan.cache_key})  # fmt: skip
        try:  # the ranks Lightning launches inherit it: the same plan (`fit` hands the checkpoint)
            resumes = fit(cfg, key, module, datamodule, trainer, ckpt_path, resume)
        finally:
            os.environ.pop(PLAN_ENV, None)
    summary = {}
    if trainer.is_global_zero:
        assistant = {
            "export_dir": str(plan.export_dir),
            "cache_key": plan.cache_key,
            "reused": not plan.trains_assistant,
            "summary": _read_json(plan.entry / "summary.json"),
        }
        summary = export_and_summarize(
            student_stage(cfg, plan.export_dir), module.stage2,
            StageTrainer(trainer, plan.switch_step), export_dir, resumes,
            extra={"assistant": assistant},
        )  # fmt: skip
    trainer.strategy.barrier("lmdistill.export")  # every rank may use the export from here on
    return summary


def build_chain(cfg: DictConfig, plan: Plan, precision: str) -> TeacherAssistantChain:
    """The chain of `plan`. Each stage is built as its own run builds it (seeded first), so
    its initial weights and RNG are those of that run; stage 2's teacher is a frozen copy of
    the assistant in the teacher's dtype, filled with the trained weights at the switch (or,
    from the cache, the export)."""
    stage2_cfg = student_stage(cfg, plan.export_dir)
    steps, seed = int(cfg.trainer.max_steps), int(cfg.seed)
    L.seed_everything(seed, workers=True, verbose=False)
    if not plan.trains_assistant:
        return TeacherAssistantChain(None, build_method(stage2_cfg, precision), 0, steps, seed)
    stage1 = build_method(assistant_stage(cfg), precision)
    stage1_rng = capture_rng()
    dtype = teacher_dtype(str(cfg.teacher.dtype), precision)
    teacher = assistant_teacher(stage1.student, str(plan.export_dir), dtype)
    L.seed_everything(seed, workers=True, verbose=False)
    stage2 = build_method(stage2_cfg, precision, teacher=teacher)
    stage2_rng = capture_rng()
    restore_rng(stage1_rng)  # the fit starts in stage 1, from the RNG its own run starts from
    return TeacherAssistantChain(stage1, stage2, plan.switch_step, steps, seed,
                                 stage2_rng=stage2_rng)  # fmt: skip


def assistant_teacher(assistant, name_or_path: str, dtype: torch.dtype) -> Teacher:
    """The assistant as stage 2's teacher: a frozen copy in eval mode (its last layer), as
    `load_teacher` would load its export; its weights are set at the switch."""
    model = copy.deepcopy(assistant).to(dtype).eval().requires_grad_(False)
    return Teacher(name_or_path=name_or_path, config=model.config,
                   layer=int(model.config.num_hidden_layers), model=model)  # fmt: skip


def assistant_stage(cfg: DictConfig) -> DictConfig:
    """Stage 1: the teacher distilled into a dense assistant (moe=1x1) of the assistant shape,
    with `assistant.method` (a name in conf/method/) or else the student's method. Its hash
    (`config_key`) names the assistant's cache entry."""
    stage = _without_assistant(cfg)
    assistant = cfg.assistant
    depth = assistant.num_hidden_layers or _teacher_depth(cfg)
    shape = {"num_hidden_layers": depth, **{f: assistant[f] for f in SHAPE_FIELDS[1:]}}
    for field, value in shape.items():
        _set(stage, f"student.{field}", value)
    _set(stage, "trainer.max_steps", assistant.max_steps)
    if assistant.method is not None:  # e.g. minilm_v2 for a MiniMoE student
        _set(stage, "method", _group_option("method", assistant.method))
    _set(stage, "moe", _group_option("moe", "1x1"))  # the assistant is dense
    return stage


def student_stage(cfg: DictConfig, assistant_dir: Path) -> DictConfig:
    """Stage 2: the assistant (its last layer) distilled into the student."""
    stage = _without_assistant(cfg)
    relation_heads = cfg.teacher.relation_heads
    _set(stage, "teacher", {
        "_target_": cfg.teacher._target_,
        "name_or_path": str(assistant_dir), "revision": None, "layer": None, "minilm_v2_layer": None,
        "relation_heads": relation_heads, "dtype": cfg.teacher.dtype, "trust_remote_code": False,
    })  # fmt: skip
    return stage


# --- the plan: where the assistant comes from --------------------------------------------------


def _plan(cfg: DictConfig, recorded: dict | None, handed: dict | None, lock: _CacheLock) -> Plan:
    """A resumed run keeps its checkpoint's chain; ranks launched by rank 0 take its plan; else
    rank 0 looks into the cache under the lock (held until the assistant is exported)."""
    if recorded is not None or handed is not None:
        source = recorded if recorded is not None else handed
        key, switch = str(source["cache_key"]), int(source["switch_step"])
        plan = Plan(key, _entry(cfg, key), switch)
        if not plan.trains_assistant and not plan.export_dir.is_dir():
            raise UserError(
                f"the teacher assistant this run distils from, {plan.export_dir}, is gone from "
                "the cache; start a new run (it trains the assistant again)"
            )
        return plan
    key = config_key(assistant_stage(cfg))
    entry = _entry(cfg, key)
    lock.acquire(entry.with_suffix(".lock"))  # parallel sweep jobs wait for the one that trains it
    if (entry / "student").is_dir():
        log.info("reusing the finished assistant %s", entry)
        return Plan(key, entry, 0)
    return Plan(key, entry, int(cfg.assistant.max_steps))


def _entry(cfg: DictConfig, key: str) -> Path:
    return Path(cfg.paths.cache_dir).expanduser() / "assistants" / key


def _handed_plan(key: str, out_dir: Path) -> dict | None:
    """The plan rank 0 chose, in a rank it launched (its environment)."""
    handed = os.environ.get(PLAN_ENV)
    if not handed:
        return None
    plan = json.loads(handed)
    return plan if (plan["run"], plan["output_dir"]) == (key, str(out_dir)) else None


def _export_assistant(chain: TeacherAssistantChain, cfg: DictConfig, plan: Plan,
                      resumes: list[dict], lock: _CacheLock) -> None:  # fmt: skip
    """At the switch: rank 0 exports the assistant and its summary into the cache entry
    (unless it is there already) and links it from the run directory; the lock goes."""
    if chain.trainer.is_global_zero:
        if plan.export_dir.is_dir():
            log.info("the assistant %s is in the cache already; kept as it is", plan.export_dir)
        else:
            stage = assistant_stage(cfg)
            _set(stage, "paths.output_dir", str(plan.entry))
            export_and_summarize(stage, chain.stage1, StageTrainer(chain.trainer, 0),
                                 plan.export_dir, resumes, method=cfg.assistant.method)  # fmt: skip
        _link(Path(cfg.paths.output_dir) / STAGE1_DIR, plan.entry)
    lock.release()


def _run_config(cfg: DictConfig, plan: Plan) -> DictConfig:
    """The config the trainer, data, callbacks and loggers are built from: both stages' steps;
    under DDP, parameters of the idle stage are expected to get no gradient."""
    run = _without_assistant(cfg)
    _set(run, "trainer.max_steps", plan.switch_step + int(cfg.trainer.max_steps))
    strategy = run.trainer.get("strategy")
    if plan.trains_assistant:
        if isinstance(strategy, DictConfig) and "find_unused_parameters" in strategy:
            _set(run, "trainer.strategy.find_unused_parameters", True)
        elif strategy == "ddp":
            _set(run, "trainer.strategy", "ddp_find_unused_parameters_true")
    return run


# --- resuming ---------------------------------------------------------------------------------


def _resolve_ckpt_path(cfg: DictConfig, key: str) -> str | None:
    """`ckpt_path` as for any run (in a rank rank 0 launched: rank 0's); without one, also an
    unfinished earlier run of this command (its output directory is another one each time:
    re-running continues it)."""
    ckpt_path = resolve_ckpt_path(cfg, key)
    handed = handed_checkpoint(key, cfg.paths.output_dir) is not None
    if ckpt_path is None and cfg.ckpt_path is None and not handed:
        previous = previous_checkpoint(cfg.paths.cache_dir, key, unfinished_only=True)
        ckpt_path = str(previous) if previous else None
    return ckpt_path


def _student_view(checkpoint: dict, path: str) -> dict:
    """The checkpoint as `check_resume` judges it: its steps are stage 2's (summary.json's
    `steps`, `trainer.max_steps`)."""
    chain = checkpoint.get(CHAIN_KEY)
    if not isinstance(chain, dict) or "switch_step" not in chain:
        raise UserError(
            f"checkpoint {path} is not a teacher-assistant run's; resume it without "
            "assistant=..., or start a new run"
        )
    steps = int(checkpoint.get("global_step", 0)) - int(chain["switch_step"])
    return {**checkpoint, "global_step": max(0, steps)}


def _check_assistant_unchanged(recorded: dict, cfg: DictConfig, path: str, resume) -> None:
    """The `assistant` settings are the checkpoint's, except where `resume.allow` lets them
    differ (the chain itself, its switch step and cache entry, stays the checkpoint's)."""
    differences = config_differences(recorded.get("assistant"), _assistant_settings(cfg),
                                     "assistant")  # fmt: skip
    resume.allowed.update(check_allowed(differences, cfg, path))


def _assistant_settings(cfg: DictConfig) -> dict:
    return json.loads(json.dumps(OmegaConf.to_container(cfg.assistant, resolve=True), default=str))


# methods that can train the (dense) assistant; sparse and once-for-all MiniLM cannot
ASSISTANT_METHODS = ("minilm_v1", "minilm_v2", "minimoe", "tinybert")


def _check_methods(cfg: DictConfig) -> None:
    """The assistant is a dense student trained by a dense method; a sparse MiniLM student is
    the teacher itself, sliced, so nothing can stand between them."""
    name = cfg.assistant.method
    if name is not None and name not in ASSISTANT_METHODS:
        raise UserError(
            f"assistant.method={name} cannot train the assistant (a dense student); use one of "
            f"{', '.join(ASSISTANT_METHODS)}, or null for the student's method"
        )
    if name is None and cfg.method._target_.endswith(".OFAMiniLM"):
        raise UserError(
            "method=ofa_minilm with an assistant: the assistant is one dense model, not a "
            "super-net; set assistant.method (e.g. minilm_v2) to train it"
        )
    if cfg.student._target_.endswith(".sparse_student"):
        raise UserError(
            "method=sparse_minilm takes no teacher assistant: its student is the teacher itself, "
            "sliced; drop assistant= (or set assistant=null)"
        )


def _check_steps(cfg: DictConfig) -> None:
    """Stage 1's steps (stage 2's, trainer.max_steps, are checked as any run's)."""
    value = cfg.assistant.max_steps
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"assistant.max_steps={value}: stage 1 trains that many optimizer steps; set it to 1 "
            "or more"
        )


# --- helpers ----------------------------------------------------------------------------------


def _without_assistant(cfg: DictConfig) -> DictConfig:
    stage = copy.deepcopy(cfg)
    # resolve everything that points at Hydra's run dir or other stages before editing
    with open_dict(stage):
        stage.paths.output_dir = str(cfg.paths.output_dir)
        stage.assistant = None
    return stage


def _group_option(group: str, name: str) -> DictConfig:
    """The config of `<group>=<name>` (its interpolations resolve in the stage's config; its
    defaults list, e.g. minimoe's moe, is not applied: the stage sets moe itself)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"unknown {group} '{name}' in assistant.{group}; use one of {options}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return node


def _teacher_depth(cfg: DictConfig) -> int:
    try:
        return int(AutoConfig.from_pretrained(cfg.teacher.name_or_path).num_hidden_layers)
    except OSError as err:
        raise UserError(
            f"cannot read the teacher config of '{cfg.teacher.name_or_path}' to size the assistant; "
            "set assistant.num_hidden_layers or fix teacher.name_or_path"
        ) from err


def _set(cfg: DictConfig, key: str, value) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)


def _link(link: Path, target: Path) -> None:
    """`link` -> `target`; an existing link (a re-run, or another process's) is left as it is."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
    except FileExistsError:  # created already: checking first and then creating would race
        pass


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class _CacheLock:
    """An exclusive lock on an assistant's cache entry (rank 0 only: `enabled`); released at
    the switch, once the assistant is exported, or when the run ends."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._handle = None

    def acquire(self, lock_file: Path) -> None:
        if not self.enabled or self._handle is not None:
            return
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(lock_file, "w")  # noqa: SIM115 - held across the fit
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> _CacheLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
