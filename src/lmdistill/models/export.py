"""Export a trained student as an ordinary Hugging Face model directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel

from lmdistill.errors import UserError

PROVENANCE_FILE = "lmdistill_provenance.json"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (no race with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """A fresh temporary directory in `parent` (mode 0700 until `publish_dir` is called)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def publish_dir(tmp: Path, target: Path) -> None:
    """Give `tmp` and everything in it the permissions `mkdir` and `open` would (0777 and 0666
    masked by the umask), then rename it to `target`.

    `tempfile.mkdtemp` makes directories 0700 and some writers (safetensors via transformers)
    make files 0600: renamed as they are, an export would be hidden from the colleagues the
    umask lets read it (a shared cluster).
    """
    umask = current_umask()
    for root, dirs, files in os.walk(tmp):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~umask)
    os.chmod(tmp, 0o777 & ~umask)
    os.replace(tmp, target)


def export_student(
    student: PreTrainedModel, tokenizer: str, out_dir: str | Path, provenance: dict
) -> Path:
    """Write weights (safetensors), config, tokenizer and provenance to `out_dir`, atomically.

    Everything is written into a temporary sibling directory that is renamed into place at the
    end, so a crash never leaves a half-written export. An existing `out_dir` is never overwritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(
            f"export directory {out_dir} already exists; remove it or run in a fresh output directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out_dir.name}.", out_dir.parent)
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, out_dir)  # modes as mkdir and open give them, then the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
