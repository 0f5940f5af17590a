"""lmdistill-sparsify end to end on the tiny teacher; resume; errors; fine-tuning a sparse student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import check_ok, run_cli, write_corpus
from glue_files import write_glue
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, BertForMaskedLM

from lmdistill.errors import UserError
from lmdistill.sparse.schedule import SUPPORTED
from lmdistill.sparsify import sparse_student

COMMON = [
    "teacher=tiny", "data=text", "data.num_workers=0", "data.batch_size=8", "data.max_seq_length=64"
]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital.*")


@pytest.fixture(scope="module")
def work(tmp_path_factory, cache_dir, tiny_teacher_dir):
    path = tmp_path_factory.mktemp("sparsify")
    write_corpus(path / "corpus.txt")
    return path


@pytest.fixture(scope="module")
def sparsified(work, cache_dir):
    """One CLI run: 3 batches, the s50 student exported."""
    out = work / "out"
    args = [*COMMON, f"data.paths=[{work / 'corpus.txt'}]", "num_batches=3", "sparsity=s50",
            f"hydra.run.dir={out}"]  # fmt: skip
    check_ok(run_cli(args, work, cache_dir, module="lmdistill.sparsify", timeout=240))
    return out


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sparsify", overrides=overrides)


def test_outputs(sparsified, tiny_teacher_dir):
    scores = load_file(str(sparsified / "importance.safetensors"))
    assert scores["head"].shape == (2, 4) and scores["neuron"].shape == (2, 64)
    assert scores["hidden"].shape == (32,) and (scores["head"] > 0).all()
    torch.testing.assert_close(scores["head_normalized"].norm(dim=-1), torch.ones(2))
    summary = json.loads((sparsified / "summary.json").read_text())
    assert summary["loss"] == "relation" and summary["batches"] == 3
    assert set(summary["plans"]) == {f"s{s}" for s in SUPPORTED}
    assert summary["student"]["hidden_size"] == summary["plans"]["s50"]["hidden_size"] == 24
    assert summary["plans"]["s0"]["gflops"] == summary["dense"]["gflops"]
    assert not (sparsified / "importance.partial.pt").exists()
    # the reordered model is a plain BERT computing the teacher's function, hidden dims reordered
    original, reordered = (
        AutoModel.from_pretrained(p).eval() for p in (tiny_teacher_dir, sparsified / "reordered")
    )
    assert type(reordered).__name__ == "BertModel"
    tokens = AutoTokenizer.from_pretrained(sparsified / "reordered")(
        ["a small test", "of order"], padding=True, return_tensors="pt"
    )
    expected = original(**tokens).last_hidden_state[..., scores["hidden_order"]]
    torch.testing.assert_close(reordered(**tokens).last_hidden_state, expected, atol=1e-5, rtol=0)
    student = AutoModel.from_pretrained(sparsified / "sparse-s50").eval()
    assert student.config.layer_heads == summary["plans"]["s50"]["layer_heads"]
    again = sparse_student(sparsified, 50)  # what a distillation method would build
    torch.testing.assert_close(again(**tokens).pooler_output, student(**tokens).pooler_output)


def test_finetune_sparse_student(sparsified, work, cache_dir):
    glue = write_glue(work / "glue", rows=8)
    out = work / "finetune"
    args = [f"model={sparsified / 'sparse-s50'}", "task=rte", f"data.glue_dir={glue}", "epochs=1",
            "batch_size=4", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]  # fmt: skip
    check_ok(run_cli(args, work, cache_dir, module="lmdistill.finetune", timeout=240))
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "rte" and 0.0 <= results["metrics"]["accuracy"] <= 1.0
    assert results["model_shape"]["hidden_size"] == 24


def test_bad_value_is_one_error_line(work, tmp_path, capsys):
    """What the entry point prints (`report_user_errors`, as `main` applies it), in-process."""
    from lmdistill.errors import report_user_errors
    from lmdistill.sparsify import run

    cfg = _compose([*COMMON, f"data.paths=[{work / 'corpus.txt'}]", "num_batches=0",
                    f"paths.output_dir={tmp_path / 'bad'}"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(run)(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("lmdistill: error: num_batches=0 must be a positive integer")
    assert not (tmp_path / "bad").exists()


def test_errors_before_anything_is_written(work, sparsified, tmp_path):
    from lmdistill.sparsify import run

    corpus = f"data.paths=[{work / 'corpus.txt'}]"
    with pytest.raises(UserError, match="finished sparsification"):
        run(_compose([*COMMON, corpus, f"paths.output_dir={sparsified}"]))
    with pytest.raises(UserError, match="no MLM head"):
        run(_compose([*COMMON, corpus, "loss=mlm", f"paths.output_dir={tmp_path / 'mlm'}"]))
    with pytest.raises(UserError, match="relation_heads=5"):
        run(_compose([*COMMON, corpus, "relation_heads=5", f"paths.output_dir={tmp_path / 'r'}"]))
    with pytest.raises(UserError, match="already a sliced sparse model"):
        sliced = f"teacher.name_or_path={sparsified / 'sparse-s50'}"
        run(_compose([*COMMON, corpus, sliced, f"paths.output_dir={tmp_path / 's'}"]))
    with pytest.raises(UserError, match="lmdistill-sparsify does not validate"):
        run(_compose([*COMMON, corpus, "data.val_batches=2", f"paths.output_dir={tmp_path / 'v'}"]))
    assert _compose([*COMMON, corpus]).data.val_batches == 0  # no document held out of the sample
    assert not (tmp_path / "mlm").exists() and not (tmp_path / "v").exists()


def test_resume_equals_an_uninterrupted_run(work, tmp_path, monkeypatch, tiny_teacher_dir):
    """MLM loss (a tiny BERT with its head); stopped after 3 batches, resumed from batch 2."""
    import lmdistill.sparsify as sparsify

    teacher = tmp_path / "mlm-teacher"
    model = BertForMaskedLM(AutoModel.from_pretrained(tiny_teacher_dir).config)
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(teacher)
    base = [*COMMON, f"teacher.name_or_path={teacher}", f"data.paths=[{work / 'corpus.txt'}]",
            "num_batches=4", "checkpoint_every=2", "data.batch_size=4", "data.max_seq_length=32"]  # fmt: skip
    whole = sparsify.run(_compose([*base, f"paths.output_dir={tmp_path / 'whole'}"]))
    assert whole["loss"] == "mlm"

    calls, accumulate = [], sparsify.accumulate

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(sparsify, "accumulate", crash_on_third)
    cfg = _compose([*base, f"paths.output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(KeyboardInterrupt):
        sparsify.run(cfg)
    assert (tmp_path / "resumed" / "importance.partial.pt").exists()
    monkeypatch.setattr(sparsify, "accumulate", accumulate)
    sparsify.run(cfg)
    a, b = (load_file(str(tmp_path / d / "importance.safetensors")) for d in ("whole", "resumed"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["batches"] == 4 and Path(summary["reordered_dir"]).is_dir()
