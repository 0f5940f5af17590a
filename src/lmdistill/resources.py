"""Files shipped by installed packages, and the OmegaConf resolvers that point at them."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from lmdistill.models.tiny import ensure_tiny_teacher
from lmdistill.packages import package_dir

__all__ = ["CONF_DIR", "job_dirname", "package_dir", "register_resolvers", "sweep_group"]


def _conf_dir() -> Path:
    """The Hydra configs: `lmdistill/conf` inside an installed wheel (the repository's `conf/`,
    shipped as the package `lmdistill.conf`), else the `conf/` of the source checkout that an
    editable install runs from."""
    packaged = Path(str(importlib.resources.files("lmdistill"))) / "conf"
    if (packaged / "distill.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = _conf_dir()


def _tiny_teacher(cache_dir: str) -> str:
    return ensure_tiny_teacher(cache_dir)


def _hydra_config():
    """Hydra's config of the running job, or None outside a Hydra app (compose, tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hydra_cfg) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def _relative_to_cwd(path: str, cwd: str | None = None) -> str:
    """`path` relative to the launch directory when it lies inside it, else absolute."""
    cwd = cwd or os.getcwd()
    path = os.path.abspath(os.path.join(cwd, path))
    relative = os.path.relpath(path, cwd)
    return path if relative == ".." or relative.startswith("../") else relative


def sweep_group(sweep_dir: str, cwd: str | None = None) -> str:
    """A sweep's W&B group: its directory relative to the launch directory (`cwd`), e.g.
    `multirun/2025-01-31/12-00-00`, or absolute when outside it."""
    return _relative_to_cwd(sweep_dir, cwd)


def _sweep_group() -> str | None:
    """`${sweep_group:}`: all jobs of a multirun share it, other sweeps differ; None for a run."""
    hydra_cfg = _hydra_config()
    if not _is_multirun(hydra_cfg):
        return None
    return sweep_group(str(hydra_cfg.sweep.dir), hydra_cfg.runtime.cwd)


def _job_name() -> str | None:
    """`${job_name:}`: a multirun job's subdirectory (`job_dirname`, unique in the sweep);
    a single run's overrides (`hydra.job.override_dirname`), else its output directory."""
    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return None  # W&B picks a name
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir")
    if _is_multirun(hydra_cfg):
        return os.path.relpath(output_dir, os.path.join(hydra_cfg.runtime.cwd, hydra_cfg.sweep.dir))
    overrides = OmegaConf.select(hydra_cfg, "job.override_dirname")
    if overrides:
        return overrides
    return _relative_to_cwd(output_dir, hydra_cfg.runtime.cwd) if output_dir else None


_DIRNAME_MAX = 200  # characters; file systems allow 255 per name
_DIRNAME_DROP = str.maketrans("", "", "[]{}()'\"\\")
_DIRNAME_MAP = str.maketrans({",": "+", ":": "-", "/": ".", "=": "-"})


def job_dirname(num, overrides: str | None) -> str:
    """`${job_dirname:${hydra.job.num},${hydra.job.override_dirname}}`: a sweep job's
    subdirectory, `<num>_<key>-<value>_<key>-<value>...` (override_dirname with kv_sep `-` and
    item_sep `_`: the overrides as typed, sorted, every `=` made `-`), e.g.
    `3_logger-csv+wandb_method-minilm_v1_student-L3-H384`.

    Only `[A-Za-z0-9._+-]` remain, so a shell takes the name without quoting and Hydra's
    override grammar takes it as a plain value (`model=<sweep>/<job>/student`): brackets, braces
    and quotes are dropped, list and dict items are joined by `+` (`[csv,wandb]` -> `csv+wandb`,
    `{qq:1,kk:2}` -> `qq-1+kk-2`), `/` becomes `.` and anything else `_`. The job number keeps
    names unique; names over 200 characters are cut and end in a hash of the whole.
    """
    text = re.sub(r"\s*([,:])\s*", r"\1", str(overrides or ""))  # Hydra keeps them as typed
    text = text.translate(_DIRNAME_DROP).translate(_DIRNAME_MAP)
    text = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
    name = f"{num}_{text}" if text else str(num)
    if len(name) > _DIRNAME_MAX:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _DIRNAME_MAX - 11]}_{digest}"
    return name


def _teacher_layer(method_target: str | None, minilm_v2_layer: int | None) -> int | None:
    """teacher.layer's default: the teacher's MiniLM v2 preset (BERT-large 21, RoBERTa-large 19)
    for MiniLM v2, the last layer (None) for every other method (docs/methods.md section 10)."""
    return minilm_v2_layer if str(method_target).rsplit(".", 1)[-1] == "MiniLMv2" else None


def _rank_suffix(job_name: str) -> str:
    """`${rank_suffix:${hydra.job.name}}`: "_rank<r>" in a process that torchrun or a cluster
    started as global rank r > 0, so that it logs to its own file; "" for rank 0 and for the
    ranks lmdistill launches itself (their job name ends in _rank<r> already)."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    if rank in (None, "", "0") or "_rank" in str(job_name):
        return ""
    return f"_rank{rank}"


def register_resolvers() -> None:
    """`${package_dir:pkg,sub}`, `${tiny_teacher:cache_dir}`, `${teacher_layer:target,layer}`,
    `${sweep_group:}`, `${job_name:}`, `${job_dirname:num,overrides}` and
    `${rank_suffix:job_name}` for the configs (idempotent)."""
    for name, fn in (("package_dir", package_dir), ("tiny_teacher", _tiny_teacher),
                     ("teacher_layer", _teacher_layer)):  # fmt: skip
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
    for name, fn in (("sweep_group", _sweep_group), ("job_name", _job_name),
                     ("job_dirname", job_dirname), ("rank_suffix", _rank_suffix)):  # fmt: skip
        if not OmegaConf.has_resolver(name):  # per job: never cached
            OmegaConf.register_new_resolver(name, fn, use_cache=False)
