"""Small file helpers: atomic writes and checked checkpoint loading."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch

from lmdistill.errors import UserError


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # once, at import: flipping it later could race with other threads


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file whose content replaces `path` only once it is complete and on disk.

    It is written to a temporary `.<name>.*.tmp` beside `path` (same file system: the rename is
    atomic), fsync'ed and renamed over `path`; on an error the temporary file is removed and
    `path` keeps its old content. A killed process can leave the temporary file, never a partial
    `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # an ordinary file, not mkstemp's 0600
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power loss


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    with open_atomic(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


_EARLIER = "pass the checkpoints/last.ckpt of an earlier run with ckpt_path=..."
_OLDER = (
    "resume from an older checkpoint with ckpt_path=... (callbacks.model_checkpoint.save_top_k=K "
    "keeps the K newest beside last.ckpt) or move it aside to start over"
)


def load_checkpoint(path: str | Path) -> dict:
    """Load a Lightning training checkpoint safely (`weights_only`), or raise a `UserError`."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt"
        hint = f"ckpt_path={inside}" if inside.is_file() else _EARLIER
        raise UserError(f"checkpoint {path} is a directory, not a checkpoint file; {hint}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; {_EARLIER}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a checkpoint we can read"
        raise UserError(_unreadable(path, err)) from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops"} <= checkpoint.keys():
        raise UserError(
            f"{path} is not a Lightning training checkpoint (no state_dict/loops); {_EARLIER}"
        )
    return checkpoint


def _unreadable(path: Path, err: Exception) -> str:
    """One line on why `torch.load` failed on `path`, and what to do instead."""
    size = path.stat().st_size
    if size == 0:
        return (
            f"checkpoint {path} is empty (0 bytes), probably cut off while being written; {_OLDER}"
        )
    with open(path, "rb") as f:
        zip_magic = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not zip_magic:
        return f"{path} is not a checkpoint (not a file written by torch.save); {_EARLIER}"
    if not zipfile.is_zipfile(path):  # the archive's directory, written last, is missing
        return (
            f"checkpoint {path} is truncated ({size} bytes, the end of the file is missing), "
            f"probably cut off while being written or copied; {_OLDER}"
        )
    reason = next(iter(str(err).strip().splitlines()), "")[:160]
    return f"checkpoint {path} cannot be loaded ({type(err).__name__}: {reason}); {_EARLIER}"


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
