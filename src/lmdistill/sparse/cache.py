"""The cache of sparsified teachers: `<paths.cache_dir>/sparsified/<key>/`.

An entry is a finished `lmdistill-sparsify` output (importance.safetensors and reordered/),
keyed by what the importance depends on: teacher (name, revision), data (without worker count,
cache location and validation: the importance reads the whole corpus), seed, number of batches, loss and relation heads. `method=sparse_minilm`
fills a missing entry itself (`ensure_sparsified`, once, under a file lock, so the jobs of a
sweep over sparsities share one); `lmdistill-sparsify` publishes its run there too (`publish`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

SCORES_FILE = "importance.safetensors"
REORDERED_DIR = "reordered"
# data keys the importance scores do not depend on
_NOT_IN_KEY = ("num_workers", "cache_dir", "val_batches", "val_paths", "val_fraction")


def importance_data(data: dict) -> dict:
    """A distillation's data settings as the importance reads them: the whole corpus, nothing
    held out for validation (which is the student's, not the teacher's sparsification's)."""
    return {**data, "val_batches": 0, "val_paths": None, "val_fraction": None}


def sparsify_key(
    teacher: str,
    revision: str | None,
    data: dict,
    seed: int,
    num_batches: int,
    loss: str,
    relation_heads: int | None,
) -> str:
    """A short content hash of everything the importance scores depend on."""
    data = {k: v for k, v in data.items() if k not in _NOT_IN_KEY}
    parts = {
        "teacher": teacher, "revision": revision, "data": data, "seed": seed,
        "num_batches": num_batches, "loss": loss,
        "relation_heads": relation_heads if loss == "relation" else None,
    }  # fmt: skip
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds a finished sparsification."""
    return (directory / SCORES_FILE).is_file() and (
        directory / REORDERED_DIR / "config.json"
    ).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held within the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish(root: str | Path, key: str, run_dir: str | Path) -> Path:
    """Make `<root>/<key>` point at the finished `run_dir` (a symlink), unless an entry exists."""
    entry = Path(root).expanduser() / key
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{key}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(run_dir).resolve(), tmp)
    os.replace(tmp, entry)  # atomic; replaces a dangling link of a deleted run
    return entry
