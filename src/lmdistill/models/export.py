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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
