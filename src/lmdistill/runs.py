"""Identify runs by their configuration, and find an earlier run's checkpoint to resume.

A run's key is a hash of the parts of its resolved config that decide what it trains (teacher,
student, method, data, optimizer, trainer, seed); output paths, loggers, callbacks and Hydra's
own settings are left out. `paths.cache_dir/runs/<key>.json` remembers the newest output
directory of each key, so `ckpt_path=last` (and teacher-assistant stages) can continue it.
While rank 0 fits, the DDP ranks it launches (they run the job's command again) take rank 0's
checkpoint from their environment (`handed_to_launched_ranks`): by then the index names this run.

The job's record (Hydra's `.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`) is written here,
not by Hydra (`hydra.output_subdir: null`): Hydra writes it before the application starts, so a
re-run refused by lmdistill would still overwrite the earlier run's record. `remember_job` keeps
the job's config at the entry point; `write_job_record` writes it once the run's checks passed,
into `.hydra/`, or `.hydra/resume-<n>/` where `.hydra/` exists already.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmdistill.errors import UserError
from lmdistill.io import open_atomic, write_json_atomic

KEY_PARTS = ("teacher", "student", "method", "data", "optim", "trainer", "seed")
LAST = "last"
HANDOFF_ENV = "LMDISTILL_RESUMING_FROM"  # rank 0's checkpoint, for the ranks it launches


def training_config(cfg: DictConfig, parts: tuple[str, ...] = KEY_PARTS) -> dict:
    """The training-relevant parts of a config, resolved: plain dicts, lists, strings, numbers."""
    return {
        part: OmegaConf.to_container(cfg[part], resolve=True)
        if isinstance(cfg[part], DictConfig)
        else cfg[part]
        for part in parts
        if part in cfg
    }


def config_key(cfg: DictConfig, parts: tuple[str, ...] = KEY_PARTS) -> str:
    """A short content hash of the training-relevant parts of a resolved config."""
    payload = json.dumps(training_config(cfg, parts), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _index_file(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / "runs" / f"{key}.json"


def record_run(cache_dir: str | Path, key: str, output_dir: str | Path) -> None:
    """Remember `output_dir` as the newest run of `key`."""
    write_json_atomic(_index_file(cache_dir, key), {"output_dir": str(Path(output_dir).resolve())})


def previous_checkpoint(
    cache_dir: str | Path, key: str, unfinished_only: bool = False
) -> Path | None:
    """`checkpoints/last.ckpt` of the newest earlier run of `key`, if there is one.

    With `unfinished_only`, a run that already wrote its summary does not count.
    """
    index = _index_file(cache_dir, key)
    if not index.is_file():
        return None
    output_dir = Path(json.loads(index.read_text())["output_dir"])
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file() or (unfinished_only and (output_dir / "summary.json").exists()):
        return None
    return checkpoint


def resolve_ckpt_path(cfg: DictConfig, key: str) -> str | None:
    """`ckpt_path` as given; for `last` the checkpoint of the newest earlier identical run.

    Without `ckpt_path`, a run whose output directory already holds `checkpoints/last.ckpt` (a
    requeued SLURM job, a run restarted in place) continues from it instead of overwriting it.
    """
    handed = handed_checkpoint(key, cfg.paths.output_dir)
    if handed is not None:
        return handed["ckpt_path"]
    if cfg.ckpt_path is None:
        own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return str(own) if own.is_file() else None
    if cfg.ckpt_path != LAST:
        return cfg.ckpt_path
    checkpoint = previous_checkpoint(cfg.paths.cache_dir, key)
    if checkpoint is None:
        raise UserError(
            "ckpt_path=last found no earlier run of exactly this configuration with a "
            "checkpoint; run without ckpt_path, or pass the checkpoint file itself (with "
            "resume.allow=[...] for settings changed since)"
        )
    return str(checkpoint)


@contextmanager
def handed_to_launched_ranks(key: str, output_dir: str | Path, ckpt_path: str | None):
    """Around rank 0's `trainer.fit`: the ranks Lightning launches inherit the environment, and
    resume from `ckpt_path` whatever the index says by the time they resolve theirs."""
    run = {"run": key, "output_dir": str(Path(output_dir).resolve())}
    os.environ[HANDOFF_ENV] = json.dumps({**run, "ckpt_path": ckpt_path})
    try:
        yield
    finally:
        os.environ.pop(HANDOFF_ENV, None)


def handed_checkpoint(key: str, output_dir: str | Path) -> dict | None:
    """{"ckpt_path": ...} that rank 0 handed to this job (same run key and output directory)."""
    handed = os.environ.get(HANDOFF_ENV)
    if not handed:
        return None
    handed = json.loads(handed)
    same = (handed["run"], handed["output_dir"]) == (key, str(Path(output_dir).resolve()))
    return handed if same else None


_job: list[tuple[DictConfig, DictConfig]] = []  # (task config, Hydra config) of the current job


def remember_job(cfg: DictConfig) -> None:
    """At the entry point, before anything runs: the job's config, for `write_job_record`."""
    from hydra.core.hydra_config import HydraConfig

    _job.clear()
    if HydraConfig.initialized():
        _job.append((copy.deepcopy(cfg), copy.deepcopy(HydraConfig.instance().cfg)))


def write_job_record() -> Path | None:
    """Write the remembered job's record into its output directory (once; rank 0); where to."""
    from lmdistill.distributed import is_first_rank

    if not _job:
        return None
    cfg, hydra_cfg = _job.pop()
    if hydra_cfg.hydra.output_subdir is not None or not is_first_rank():
        return None  # Hydra wrote it (an explicit hydra.output_subdir), or another rank does
    output_dir = Path(hydra_cfg.hydra.runtime.output_dir)
    record, n = output_dir / ".hydra", 0
    while True:
        try:
            record.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            record = output_dir / ".hydra" / f"resume-{n}"
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_cfg),
        ("overrides.yaml", hydra_cfg.hydra.overrides.task),
    ):
        with open_atomic(record / name, "w") as f:
            f.write(OmegaConf.to_yaml(node))
    return record
