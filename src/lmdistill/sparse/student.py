"""The builder of sparse MiniLM students (a `_target_` for the `student` config group).

The student is the teacher sliced at the target sparsity, embeddings included
(docs/methods.md section 6), from the cached sparsified teacher (`lmdistill.sparse.cache`);
a missing entry is computed first, never replaced by a random student.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from lmdistill.errors import UserError
from lmdistill.models.sparse import SparseBertModel
from lmdistill.models.teacher import Teacher, _load_config
from lmdistill.sparse.cache import (
    SCORES_FILE,
    file_lock,
    importance_data,
    is_complete,
    sparsify_key,
)
from lmdistill.sparse.schedule import prune_percent

log = logging.getLogger("lmdistill")

# lmdistill-sparsify settings a cache fill uses (conf/sparsify.yaml has their meaning)
SPARSIFY_DEFAULTS = {
    "num_batches": 64, "loss": "auto", "relation_heads": 32, "device": "auto",
    "checkpoint_every": 8, "log_every": 8,
}  # fmt: skip


def ensure_sparsified(
    teacher: str, revision: str | None, data: dict, seed: int, settings: dict, cache_dir: str
) -> Path:
    """The cache entry of this teacher, data, seed and settings; computed first if missing.

    One process computes it (file lock) into `<key>.run/` (resumable there), then renames it to
    `<key>/`; the others wait and reuse it.
    """
    from lmdistill import sparsify

    settings = {**SPARSIFY_DEFAULTS, **(settings or {})}
    data = importance_data(data)
    loss = settings["loss"]
    if loss == "auto":
        config = _load_config(teacher, revision, False)
        loss = "mlm" if sparsify.has_mlm_head(config) else "relation"
    root = Path(cache_dir).expanduser()
    key = sparsify_key(teacher, revision, data, seed, settings["num_batches"], loss,
                       settings["relation_heads"])  # fmt: skip
    entry = root / key
    if is_complete(entry):
        return entry
    with file_lock(root / f".{key}.lock"):
        if is_complete(entry):
            return entry
        work = root / f"{key}.run"
        if not is_complete(work):
            if (work / SCORES_FILE).exists():
                shutil.rmtree(work)  # a fill that stopped while exporting: start it over
            log.info(
                "sparsifying %s into the cache %s (once per teacher, data, seed)", teacher, entry
            )
            cfg = OmegaConf.create({
                **settings, "loss": loss, "seed": seed, "resume": True, "cache_dir": None,
                "teacher": {"name_or_path": teacher, "revision": revision, "trust_remote_code": False},
                "data": data, "paths": {"output_dir": str(work)},
            })  # fmt: skip
            sparsify.run(cfg, record_job=False)
        if entry.is_symlink():
            entry.unlink()  # a dangling link to a deleted lmdistill-sparsify run
        work.rename(entry)
    return entry


def sparse_student(
    teacher: Teacher,
    sparsity: float,
    data: dict,
    seed: int,
    cache_dir: str,
    teacher_revision: str | None = None,
    sparsify: dict | None = None,
    **_ignored,
) -> SparseBertModel:
    """The teacher sliced at `sparsity` (percent): a `SparseBertModel` with its embeddings and
    pooler. `**_ignored` takes the student group's shape fields, which the plan replaces."""
    prune_percent(sparsity)  # a bad sparsity is one line before any work
    if _ignored.get("init_from_teacher") not in (None, False):
        raise UserError(
            f"student.init_from_teacher={_ignored['init_from_teacher']} does nothing with "
            "method=sparse_minilm (its student is the teacher itself, sliced); remove it"
        )
    moe = _ignored.get("moe") or {}
    experts = [int(getattr(moe, k, None) or (moe.get(k, 1) if isinstance(moe, dict) else 1))
               for k in ("attention_experts", "ffn_experts")]  # fmt: skip
    if experts != [1, 1]:
        raise UserError("sparse students are dense; use moe=1x1 with method=sparse_minilm")
    if teacher.config.model_type == "lmdistill-sparse":
        raise UserError("the teacher is already sparse; distil from the unpruned teacher")
    from lmdistill.sparsify import sparse_student as slice_sparsified

    entry = ensure_sparsified(teacher.name_or_path, teacher_revision, data, seed, sparsify or {},
                              cache_dir)  # fmt: skip
    student = slice_sparsified(entry, sparsity, encoder_only=True)
    return student.train()
