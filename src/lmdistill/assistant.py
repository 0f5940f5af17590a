"""Teacher-assistant distillation: teacher -> assistant -> student in one command (docs/methods.md
section 4), for any method: the `assistant` config group (null: no assistant).

    <run dir>/
      stage1_assistant -> <cache_dir>/assistants/<key>/   (checkpoints/, logs/, student/, summary.json)
      stage2_student/                                    (checkpoints/, logs/, student/, summary.json)
      summary.json                                       the final student's, naming the assistant

Stage 1 trains in a cache entry keyed by a hash of teacher, assistant shape, method, data,
optimizer, trainer and seed: a finished entry is reused by any later run (also from another run
directory or sweep job); an unfinished one is resumed from its last checkpoint. Stage 2 uses the
assistant's export as its teacher (its last layer); re-running the same command (or
`ckpt_path=last`) continues an unfinished stage 2.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig

from lmdistill.distributed import is_first_rank
from lmdistill.errors import UserError
from lmdistill.io import write_json_atomic
from lmdistill.pipeline import run
from lmdistill.resources import CONF_DIR
from lmdistill.runs import LAST, config_key, previous_checkpoint

log = logging.getLogger("lmdistill")

STAGE1_DIR, STAGE2_DIR = "stage1_assistant", "stage2_student"
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def run_with_assistant(cfg: DictConfig) -> dict:
    """Run both stages; returns the final student's summary (with an `assistant` entry)."""
    out_dir = Path(cfg.paths.output_dir)
    stage1 = assistant_stage(cfg)
    key = config_key(stage1)
    entry = Path(cfg.paths.cache_dir).expanduser() / "assistants" / key
    # parallel sweep jobs wait for one trainer; the other DDP ranks of this job train with it
    lock = _locked(entry.with_suffix(".lock")) if is_first_rank() else contextlib.nullcontext()
    with lock:
        reused = (entry / "student").is_dir()
        if reused:
            log.info("reusing the finished assistant %s", entry)
        else:
            resume = entry / "checkpoints" / "last.ckpt"
            _set(stage1, "paths.output_dir", str(entry))
            _set(stage1, "ckpt_path", str(resume) if resume.is_file() else None)
            run(stage1)
    if is_first_rank():  # one rank writes the run directory; the others only read the cache
        _link(out_dir / STAGE1_DIR, entry)

    stage2 = student_stage(cfg, entry / "student")
    _set(stage2, "paths.output_dir", str(out_dir / STAGE2_DIR))
    if cfg.ckpt_path in (None, LAST):  # continue an unfinished stage 2 of this configuration
        previous = previous_checkpoint(
            cfg.paths.cache_dir, config_key(stage2), unfinished_only=True
        )
        _set(stage2, "ckpt_path", str(previous) if previous else None)
    summary = run(stage2)
    if not summary:  # not the global-zero rank
        return summary
    summary["assistant"] = {
        "export_dir": str(entry / "student"),
        "cache_key": key,
        "reused": reused,
        "summary": _read_json(entry / "summary.json"),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def assistant_stage(cfg: DictConfig) -> DictConfig:
    """Stage 1: the teacher distilled into a dense assistant (moe=1x1) of the assistant shape,
    with `assistant.method` (a name in conf/method/) or else the student's method."""
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
    _name_wandb_run(stage, cfg, STAGE1_DIR)
    return stage


def student_stage(cfg: DictConfig, assistant_dir: Path) -> DictConfig:
    """Stage 2: the assistant (its last layer) distilled into the student."""
    stage = _without_assistant(cfg)
    relation_heads = cfg.teacher.relation_heads
    _set(stage, "teacher", {
        "_target_": cfg.teacher._target_,
        "name_or_path": str(assistant_dir), "revision": None, "layer": None,
        "relation_heads": relation_heads, "dtype": cfg.teacher.dtype, "trust_remote_code": False,
    })  # fmt: skip
    _set(stage, "ckpt_path", None if cfg.ckpt_path == LAST else cfg.ckpt_path)
    _name_wandb_run(stage, cfg, STAGE2_DIR)
    return stage


def _without_assistant(cfg: DictConfig) -> DictConfig:
    stage = copy.deepcopy(cfg)
    # resolve everything that points at Hydra's run dir or other stages before editing
    with open_dict(stage):
        stage.paths.output_dir = str(cfg.paths.output_dir)
        stage.assistant = None
    return stage


def _group_option(group: str, name: str) -> DictConfig:
    """The config of `<group>=<name>` (its interpolations resolve in the stage's config)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"unknown {group} '{name}' in assistant.{group}; use one of {options}")
    return OmegaConf.load(path)


def _teacher_depth(cfg: DictConfig) -> int:
    try:
        return int(AutoConfig.from_pretrained(cfg.teacher.name_or_path).num_hidden_layers)
    except OSError as err:
        raise UserError(
            f"cannot read the teacher config of '{cfg.teacher.name_or_path}' to size the assistant; "
            "set assistant.num_hidden_layers or fix teacher.name_or_path"
        ) from err


def _name_wandb_run(stage: DictConfig, cfg: DictConfig, stage_name: str) -> None:
    """W&B: both stages' runs grouped under the sweep's group, or else the run directory's name."""
    if "wandb" in (cfg.get("logger") or {}):
        sweep = cfg.logger.wandb.group  # set in a multirun
        job = Path(cfg.paths.output_dir).name
        _set(stage, "logger.wandb.group", sweep or job)
        _set(stage, "logger.wandb.name", f"{job}/{stage_name}" if sweep else stage_name)


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


@contextlib.contextmanager
def _locked(lock_file: Path):
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
