"""Resume only what was asked for: a checkpoint carries the resolved config that trained it.

`RecordConfig` writes the training-relevant parts of the resolved config (`runs.KEY_PARTS`:
teacher, student, method, data, optim, trainer, seed) into every checkpoint, under
`checkpoint["lmdistill_config"]`, with the history of earlier resumes. Before training on from a
checkpoint (`ckpt_path=<file>`, `ckpt_path=last`, or a restart in place), `check_resume`:

* compares that config with the new one and refuses, in one line naming the keys, any difference
  that `resume.allow` does not name (`resume.allow=[trainer.max_steps]`); an allowed difference
  takes effect from the resumed step on and is recorded in the summary, the export's provenance
  and the next checkpoints;
* reports a finished run instead of training it again: a checkpoint at `trainer.max_steps`
  whose run wrote its summary is finished (exit 0, nothing written); a checkpoint past
  `trainer.max_steps`, one at it without a summary, or an output directory that already holds a
  summary are errors (exit 2), since training would repeat or overwrite what exists.

Checkpoints written before lmdistill recorded configs resume with a warning (their tensor shapes
and rank count are still checked): refusing them would strand requeued jobs across an upgrade.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmdistill import __version__
from lmdistill.errors import UserError
from lmdistill.runs import training_config
from lmdistill.tracking import wandb_run_id

log = logging.getLogger("lmdistill")

CONFIG_KEY = "lmdistill_config"  # top level: the module's own `lmdistill` entry is rebuilt on save
_MISSING = "<unset>"
_SHOWN = 8  # differing keys named in full in the one-line refusal


@dataclass
class Resume:
    """What a resumed run continues from (recorded in summary.json and the export's provenance)."""

    checkpoint: str
    step: int
    config_checked: bool  # False: the checkpoint records no config (an older lmdistill)
    allowed: dict[str, list] = field(default_factory=dict)  # key: [checkpoint's value, this run's]
    history: list[dict] = field(default_factory=list)  # earlier resumes of the checkpoint's run

    def record(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "step": self.step,
            "config_checked": self.config_checked,
            "allowed_differences": self.allowed,
        }


class RecordConfig(L.Callback):
    """Write this run's training config (and its resume history, and the id of its W&B run)
    into every checkpoint."""

    def __init__(self, cfg: DictConfig, resume: Resume | None = None):
        self.config = _plain(training_config(cfg))
        self.history = [*resume.history, resume.record()] if resume is not None else []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = {
            "config": self.config,
            "resumes": self.history,
            "lmdistill_version": __version__,
            "wandb_run_id": wandb_run_id(trainer.loggers),  # a resume continues this W&B run
        }


def checkpoint_wandb_run_id(checkpoint: dict | None) -> str | None:
    """The W&B run that trained up to `checkpoint` (None: none, or no checkpoint)."""
    recorded = (checkpoint or {}).get(CONFIG_KEY)
    return recorded.get("wandb_run_id") if isinstance(recorded, dict) else None


def check_resume(checkpoint: dict, cfg: DictConfig, path: str | Path) -> tuple[Resume, Path | None]:
    """Refuse config changes not in `resume.allow`; detect a finished run (see module docstring).

    Returns the resume record and, for a finished run, its summary.json (then nothing is to be
    trained).
    """
    step = int(checkpoint.get("global_step", 0))
    recorded = checkpoint.get(CONFIG_KEY)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        log.warning(
            "checkpoint %s records no config (an earlier lmdistill wrote it): whether it was "
            "trained with this run's teacher, student, method, data, optim and trainer settings "
            "cannot be checked",
            path,
        )
        resume = Resume(str(path), step, config_checked=False)
    else:
        differences = check_allowed(
            config_differences(recorded["config"], _plain(training_config(cfg))), cfg, path
        )
        resume = Resume(str(path), step, True, differences, list(recorded.get("resumes") or []))
        if differences:
            log.warning("resuming %s with allowed changes: %s", path, _describe(differences))
    return resume, _finished(resume, cfg)


def check_allowed(differences: dict[str, list], cfg: DictConfig, path: str | Path) -> dict:
    """Refuse (one line) the `differences` from checkpoint `path` that `resume.allow` does not
    name; returns them all (each allowed)."""
    allow = _allowed_keys(cfg)
    refused = {k: v for k, v in differences.items() if not _is_allowed(k, allow)}
    if refused:
        raise UserError(_refusal(path, refused))
    return differences


def _finished(resume: Resume, cfg: DictConfig) -> Path | None:
    """The finished run's summary.json, None to train on, or a `UserError`."""
    max_steps = int(cfg.trainer.max_steps)
    own = Path(cfg.paths.output_dir) / "summary.json"
    where = f"checkpoint {resume.checkpoint} (step {resume.step})"
    longer = (
        "to train longer, continue it in a new output directory: "
        f"ckpt_path={resume.checkpoint} trainer.max_steps=<more> resume.allow=[trainer.max_steps]"
    )
    if 0 <= max_steps < resume.step:
        raise UserError(
            f"{where} is past trainer.max_steps={max_steps}: nothing to train; for fewer steps "
            "resume from an earlier step checkpoint (callbacks.model_checkpoint.save_top_k)"
        )
    if max_steps == resume.step:
        for summary in (own, _summary_of_checkpoint_run(resume.checkpoint)):
            if _summary_steps(summary) == resume.step:
                return summary
        raise UserError(
            f"{where} already holds all trainer.max_steps={max_steps} steps but its run has "
            f"no summary.json (it stopped before exporting); {longer}"
        )
    if own.is_file():  # more steps asked for, in a directory that holds a finished run
        raise UserError(
            f"{own.parent} holds a finished run ({own.name} exists) and nothing of it is "
            f"overwritten; {longer}"
        )
    return None


def report_finished(summary_path: Path) -> dict:
    """One line for a run found finished (nothing is trained, exported or written); its summary."""
    summary = json.loads(summary_path.read_text())
    log.info(
        "already finished: %s steps, final loss %s; summary %s, student %s; not trained or "
        "exported again",
        summary.get("steps"), summary.get("final_loss"), summary_path, summary.get("export_dir"),
    )  # fmt: skip
    return summary


def _summary_of_checkpoint_run(path: str | Path) -> Path:
    """`<run>/summary.json` for a checkpoint at `<run>/checkpoints/<name>.ckpt`."""
    return Path(path).expanduser().resolve().parent.parent / "summary.json"


def config_differences(old: Any, new: Any, prefix: str = "") -> dict[str, list]:
    """{dotted key: [old value, new value]} for every value that differs, sorted by key.

    Dicts present on both sides are compared key by key; anything else (lists, a dict on one
    side only) as a whole."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return {} if old == new else {prefix: [old, new]}
    differences: dict[str, list] = {}
    for key in sorted(old.keys() | new.keys(), key=str):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        differences.update(
            config_differences(old.get(key, _MISSING), new.get(key, _MISSING), dotted)
        )
    return differences


def _allowed_keys(cfg: DictConfig) -> list[str]:
    allow = OmegaConf.select(cfg, "resume.allow", default=None)
    if allow is None:
        return []
    if isinstance(allow, str):
        allow = [allow]
    if not isinstance(allow, (list, ListConfig)) or not all(isinstance(a, str) for a in allow):
        raise UserError(
            f"resume.allow must be a list of config keys, got {allow!r}; "
            "e.g. resume.allow=[trainer.max_steps,optim.lr]"
        )
    return [a.strip() for a in allow if a.strip()]


def _is_allowed(key: str, allow: list[str]) -> bool:
    """`trainer.max_steps` allows that key; `optim` allows every key under it."""
    return any(key == a or key.startswith(a + ".") for a in allow)


def _refusal(path: str | Path, refused: dict[str, list]) -> str:
    keys = list(refused)
    shown = _describe({k: refused[k] for k in keys[:_SHOWN]})
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return (
        f"checkpoint {path} was trained with other settings: {shown}{more}; resume with the "
        f"checkpoint's settings, start a new run, or let them differ: "
        f"resume.allow=[{','.join(keys)}]"
    )


def _describe(differences: dict[str, list]) -> str:
    return ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in differences.items())


def _short(value: Any, limit: int = 40) -> str:
    text = value if value == _MISSING else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(config: dict) -> dict:
    """JSON types only, so `torch.load(weights_only=True)` reads it back unchanged."""
    return json.loads(json.dumps(config, default=str))


def _summary_steps(path: Path) -> int | None:
    """The `steps` of a summary.json, or None where there is none (or it cannot be read)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary.get("steps") if isinstance(summary, dict) else None
