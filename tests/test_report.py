"""lmdistill-report over fabricated distillation and fine-tuning runs; the notebook is valid."""

from __future__ import annotations

import ast
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_env

from lmdistill.glue.report_tables import build_rows, collect, to_markdown
from lmdistill.report import make_report

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "sweep_report.ipynb"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _distill_run(run: Path, method: str, layers: int, gflops: float, losses: list[float]) -> Path:
    student = run / "student"
    student.mkdir(parents=True)
    (student / "lmdistill_provenance.json").write_text("{}")
    _write(run / "summary.json", {
        "method": method,
        "teacher": {"name_or_path": "/models/minilm", "layer": 6},
        "student": {"num_hidden_layers": layers, "hidden_size": 384, "num_attention_heads": 12,
                    "params": 15_000_000 + layers, "gflops": gflops},
        "steps": len(losses), "export_dir": str(student),
    })  # fmt: skip
    (run / "logs").mkdir()
    rows = "".join(f"{i},{loss},\n" for i, loss in enumerate(losses))
    (run / "logs" / "metrics.csv").write_text("step,train/loss,lr-AdamW\n" + rows)
    return student


def _result(out: Path, model: Path | str, task: str, metrics: dict, **extra) -> None:
    _write(out / "results.json", {"task": task, "model": str(model), "metrics": metrics, **extra})


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two distillation runs; a grid on one student (RTE x 3 seeds) and single runs on both."""
    root = tmp_path / "sweep"
    v1 = _distill_run(root / "distill" / "0", "minilm_v1", 3, 1.2, [5.0, 3.0, 2.0])
    v2 = _distill_run(root / "distill" / "1", "minilm_v2", 4, 1.6, [4.0, 2.5, 1.5, 1.0])
    ft = root / "finetune"
    for i, acc in enumerate([0.60, 0.64, 0.62]):
        _result(ft / f"rte_{i}", v1, "rte", {"accuracy": acc}, seed=i)
    _result(ft / "cola", v1, "cola", {"mcc": 0.30})
    _result(ft / "mrpc", v2, "mrpc", {"f1": 0.84, "accuracy": 0.76})
    _result(ft / "stsb", v2, "stsb", {"pearson": 0.80, "spearman": 0.78})
    return root


def test_join_best_median_and_average(runs):
    rows = {r.method: r for r in build_rows(*collect([runs]))}
    v1, v2 = rows["minilm_v1"], rows["minilm_v2"]
    assert (v1.shape, v1.gflops, v1.params) == ("3x384", 1.2, 15_000_003)
    assert v1.best("rte") == pytest.approx(64.0) and v1.median("rte") == pytest.approx(62.0)
    assert v1.average() == pytest.approx((64.0 + 30.0) / 2)
    assert v2.best("mrpc") == pytest.approx(80.0)  # mean of F1 and accuracy
    assert v2.best("stsb") == pytest.approx(79.0)  # mean of Pearson and Spearman
    assert v2.average() == pytest.approx(statistics.mean([80.0, 79.0]))
    markdown = to_markdown(list(rows.values()))
    assert (
        "| method | teacher | student (LxH) | params (M) | GFLOPs | cola | mrpc | stsb | rte |"
        in markdown
    )
    assert "Median over the runs" in markdown


def test_join_through_provenance_after_a_move(runs, tmp_path):
    moved = tmp_path / "moved"
    (runs / "distill").rename(moved)  # summary.export_dir now points nowhere
    _result(runs / "finetune" / "rte_moved", moved / "1" / "student", "rte", {"accuracy": 0.7})
    rows = {r.method: r for r in build_rows(*collect([runs]))}
    assert rows["minilm_v2"].best("rte") == pytest.approx(70.0)


def test_cli_writes_table_csv_and_plots(runs, tmp_path, cache_dir):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "lmdistill.report", str(runs / "distill"), str(runs / "finetune"),
         "--out", str(out)],
        env=cli_env(cache_dir), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("report.md", "report.csv", "score_vs_gflops.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("score_vs_gflops.png", "loss_curves.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    with open(out / "report.csv", newline="") as f:
        records = {r["method"]: r for r in csv.DictReader(f)}
    assert float(records["minilm_v1"]["rte"]) == pytest.approx(64.0)
    assert float(records["minilm_v1"]["rte_median"]) == pytest.approx(62.0)
    assert records["minilm_v1"]["rte_runs"] == "3"
    assert "minilm_v2" in (out / "report.md").read_text()


def test_report_to_wandb_offline(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lmdistill.report import log_to_wandb

    files = make_report([runs], tmp_path / "wb")
    log_to_wandb(files)
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def test_no_runs_is_one_error_line(tmp_path, capsys):
    from lmdistill.report import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmdistill: error: no summary.json or results")


def test_notebook_is_valid_and_compiles():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        source = "".join(cell["source"])
        ast.parse(source)  # a SyntaxError fails the test
        compile(source, str(NOTEBOOK), "exec")
