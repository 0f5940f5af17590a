"""Checkpoints written atomically: a crash while saving never leaves a partial last.ckpt.

Lightning's `TorchCheckpointIO` writes local files through an fsspec transaction whose temporary
file lies in the system temp directory (`$TMPDIR`), then moves it into place. Where that
directory is on another file system than the checkpoints (a tmpfs /tmp, node-local scratch,
network storage), the move is a copy into `last.ckpt` itself, so a crash or a full disk midway
leaves a truncated `last.ckpt`; nothing is fsync'ed either. `AtomicCheckpointIO` writes beside
the target instead, fsyncs, and renames (`lmdistill.io.open_atomic`). Remote paths (s3://, ...)
go to Lightning's implementation unchanged.

A full disk (or quota) while saving is one line (`NoSpaceError`, a `UserError`: exit 2) instead of
torch's `inline_container.cc ... unexpected pos` traceback; the previous checkpoint is intact.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO

from lmdistill.errors import UserError
from lmdistill.io import open_atomic

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(UserError):
    """The checkpoint did not fit on its file system; the previous one is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic and durable.

    Wire it as a Trainer plugin: `plugins: [{_target_: lmdistill.checkpoint_io.AtomicCheckpointIO}]`.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local_path)
        _remove_leftovers(target)
        existed = target.is_file()
        try:
            with open_atomic(target, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:
            if not _is_no_space(err):
                raise
            kept = (
                f"the previous {target.name} is intact"
                if existed
                else f"no {target.name} was written"
            )
            raise NoSpaceError(
                f"no space left on {target.parent}; {kept}: free space (or write elsewhere: "
                "paths.output_dir=...), then resume with ckpt_path=last"
            ) from err
        return None


def _is_no_space(err: BaseException | None) -> bool:
    """Whether `err` is, or was raised while handling, a full disk (torch.save raises a
    RuntimeError `unexpected pos` whose context is the OSError of the failed write)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _remove_leftovers(target: Path) -> None:
    """Temporary files of earlier saves of `target` by a process killed while writing.

    Safe because one process writes a given checkpoint file (global rank zero, one at a time).
    """
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
