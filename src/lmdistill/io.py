"""Small file helpers: atomic writes and checked checkpoint loading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lmdistill.errors import UserError


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as an ordinary file, not mkstemp's private 0600
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a Lightning training checkpoint safely (`weights_only`), or raise a `UserError`."""
    path = Path(path).expanduser()
    fix = "pass the checkpoints/last.ckpt of an earlier run with ckpt_path=..."
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a checkpoint we can read"
        raise UserError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); {fix}"
        ) from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops"} <= checkpoint.keys():
        raise UserError(
            f"{path} is not a Lightning training checkpoint (no state_dict/loops); {fix}"
        )
    return checkpoint


def check_checkpoint_matches(checkpoint: dict, module: torch.nn.Module, path: str | Path) -> None:
    """Fail with one line when a checkpoint was written for another student or method."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    if expected != found:
        key = next(iter(sorted(expected.keys() ^ found.keys())), None) or next(
            k for k in expected if expected[k] != found[k]
        )
        raise UserError(
            f"checkpoint {path} does not fit this student/method (first difference: '{key}' "
            f"{found.get(key, 'missing')} vs {expected.get(key, 'missing')}); resume with the "
            "teacher, student and method of the run that wrote it"
        )
