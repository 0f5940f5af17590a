"""method=sparse_minilm: a sweep over sparsities shares one cached sparsified teacher;
lmdistill-sparsify fills the same cache; the student is the sliced teacher, never random."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import TINY, check_ok, run_cli, write_corpus
from omegaconf import OmegaConf
from test_sparsify_cli import COMMON, _compose

from lmdistill.errors import UserError
from lmdistill.models.sparse import SparseBertModel, sparse_gflops

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital.*")
FAST = ["data.max_seq_length=32", "data.batch_size=4"]


def test_sweep_over_sparsities_shares_one_sparsification(tmp_path, cache_dir):
    write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "sweep"
    args = ["-m", *TINY, *FAST, f"data.paths=[{tmp_path / 'corpus.txt'}]", "method=sparse_minilm",
            "sparsity=s50,s90", "student.sparsify.num_batches=1", "trainer.max_steps=1",
            "data.val_batches=1", "data.val_fraction=0.5",  # the student validates, not the fill
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={out}"]  # fmt: skip
    _, stdout, stderr = check_ok(run_cli(args, tmp_path, cache_dir, timeout=300))
    assert (stdout + stderr).count("sparsifying") == 1  # the second job reuses the cache entry
    entries = [
        p for p in (tmp_path / "cache" / "sparsified").iterdir() if not p.name.startswith(".")
    ]
    assert len(entries) == 1 and (entries[0] / "importance.safetensors").is_file()
    hidden = {}
    for summary_path in sorted(out.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        sparse = summary["sparse_student"]
        assert summary["method"] == "sparse_minilm" and summary["relation_site"] == "top_projection"
        student = SparseBertModel.from_pretrained(summary["export_dir"])
        assert student.config.layer_heads == sparse["layer_heads"]
        assert sparse["gflops"] == pytest.approx(sparse_gflops(student.config))
        hidden[sparse["sparsity"]] = sparse["hidden_size"]
    assert hidden == {50.0: 24, 90.0: 8}  # d = 32: round(29% of 32) = 9 -> 8 pruned; 22 -> 24


def test_sparsify_fills_the_cache_the_method_reads(tmp_path, monkeypatch, tiny_teacher_dir):
    import lmdistill.sparsify as sparsify
    from lmdistill.models.teacher import load_teacher
    from lmdistill.sparse.student import sparse_student

    write_corpus(tmp_path / "corpus.txt")
    corpus = f"data.paths=[{tmp_path / 'corpus.txt'}]"
    cache = tmp_path / "cache"
    cfg = _compose([*COMMON, *FAST, corpus, "num_batches=2", f"paths.cache_dir={cache}",
                    f"paths.output_dir={tmp_path / 'run'}"])  # fmt: skip
    summary = sparsify.run(cfg)
    assert summary["cache_entry"].startswith(str(cache / "sparsified"))

    def never(*args, **kwargs):
        raise AssertionError("the cache entry should have been found")

    monkeypatch.setattr(sparsify, "run", never)
    teacher = load_teacher(cfg.teacher.name_or_path)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(
        val_batches=4, val_fraction=0.1
    )  # a distillation's validation: not the importance's
    student = sparse_student(teacher, 90, data, cfg.seed, str(cache / "sparsified"),
                             sparsify={"num_batches": 2, "relation_heads": 4})  # fmt: skip
    expected = sparsify.sparse_student(tmp_path / "run", 90, encoder_only=True)
    for name, value in expected.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    with pytest.raises(UserError, match="sparsity"):
        sparse_student(teacher, 100, data, cfg.seed, str(cache / "sparsified"))
    with pytest.raises(UserError, match="init_from_teacher=True does nothing"):
        sparse_student(teacher, 90, data, cfg.seed, str(cache / "sparsified"),
                       init_from_teacher=True)  # fmt: skip


def test_method_settings_are_checked(tiny_teacher_dir):
    from lmdistill.models.teacher import load_teacher
    from lmdistill.sparse import SparsityPlan, slice_model
    from lmdistill.sparse.method import SparseMiniLM

    teacher = load_teacher(tiny_teacher_dir)
    student = slice_model(teacher.model, SparsityPlan(90, 68, [2, 0], [10, 10], 16, 0, 0))
    with pytest.raises(UserError, match="no attention heads left"):
        SparseMiniLM(teacher, student, relation_heads=4, relation_site="last_layer")
    with pytest.raises(UserError, match="relation_heads=5"):
        SparseMiniLM(teacher, student, relation_heads=5)
    method = SparseMiniLM(teacher, student, relation_heads=4)  # top projection: d' 16 -> 3 x 32
    batch = {
        "input_ids": torch.randint(1000, 2000, (2, 6)),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
    }
    loss, terms = method.step_loss(batch)
    assert set(terms) == {"qq", "kk", "vv"} and torch.isfinite(loss)
