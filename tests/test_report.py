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


def _distill_run(run: Path, method: str, layers: int, gflops: float, losses: list[float],
                 teacher: str = "/models/minilm") -> Path:  # fmt: skip
    student = run / "student"
    student.mkdir(parents=True)
    (student / "lmdistill_provenance.json").write_text("{}")
    _write(run / "summary.json", {
        "method": method,
        "teacher": {"name_or_path": teacher, "layer": 6},
        "student": {"num_hidden_layers": layers, "hidden_size": 384, "num_attention_heads": 12,
                    "params": 15_000_000 + layers, "gflops": gflops},
        "steps": len(losses), "final_loss": losses[-1], "export_dir": str(student),
    })  # fmt: skip
    (run / "logs").mkdir()
    rows = "".join(f"{i},{loss},\n" for i, loss in enumerate(losses))
    (run / "logs" / "metrics.csv").write_text("step,train/loss,lr-AdamW/pg1\n" + rows)
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
        "| run | method | teacher | student (LxH) | steps | final loss | family | params (M) "
        "| GFLOPs | cola | mrpc | stsb | rte | average |" in markdown
    )
    assert "Median over the runs" in markdown


@pytest.fixture
def lookalikes(runs) -> Path:
    """`runs` plus two more minilm_v2 4x384 students: another teacher (same leaf directory name
    `1` as distill/1), and more steps; and a hub model fine-tuned pretrained and from random."""
    _distill_run(runs / "other" / "1", "minilm_v2", 4, 1.6, [4.0, 3.0], teacher="/hub/bert-base")
    v2b = _distill_run(runs / "distill" / "2", "minilm_v2", 4, 1.6, [4.0, 2.0, 1.0, 0.8, 0.5])
    _result(runs / "finetune" / "rte_v2b", v2b, "rte", {"accuracy": 0.66})
    for init, acc in (("pretrained", 0.7), ("random", 0.5)):
        _result(runs / "finetune" / f"hub_{init}", "bert-base-uncased", "rte", {"accuracy": acc},
                init=init, model_name="bert-base-uncased")  # fmt: skip
    return runs


EXPECTED_RUNS = {  # run name: (method, teacher, steps, final loss)
    "0": ("minilm_v1", "/models/minilm", 3, 2.0),
    "distill/1": ("minilm_v2", "/models/minilm", 4, 1.0),
    "other/1": ("minilm_v2", "/hub/bert-base", 2, 3.0),
    "2": ("minilm_v2", "/models/minilm", 5, 0.5),
    "bert-base-uncased": ("bert-base-uncased", "-", None, None),
    "bert-base-uncased (random init)": ("bert-base-uncased (random init)", "-", None, None),
}


def test_every_run_has_its_own_name_and_row(lookalikes, tmp_path):
    rows = build_rows(*collect([lookalikes]))
    got = {r.run: (r.method, r.teacher, r.steps, r.final_loss) for r in rows}
    assert got == EXPECTED_RUNS
    markdown = to_markdown(rows)
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1 : len(rows) + 1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    by_run = {c[0]: c for c in cells}
    assert sorted(by_run) == sorted(EXPECTED_RUNS)
    assert by_run["other/1"][1:6] == ["minilm_v2", "bert-base", "4x384", "2", "3.0000"]
    assert by_run["2"][1:6] == ["minilm_v2", "minilm", "4x384", "5", "0.5000"]
    assert by_run["bert-base-uncased"][4:6] == ["-", "-"]
    files = make_report([lookalikes], tmp_path / "report")
    with open(files["report.csv"], newline="") as f:
        records = list(csv.DictReader(f))
    assert sorted(r["run"] for r in records) == sorted(EXPECTED_RUNS)
    record = next(r for r in records if r["run"] == "other/1")
    assert (record["steps"], float(record["final_loss"]), record["teacher"]) == (
        "2", 3.0, "/hub/bert-base")  # fmt: skip


def _legends(fig) -> dict[str, list[str]]:
    return {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()]
            for ax in fig.axes if ax.get_visible() and ax.get_legend()}  # fmt: skip


def test_loss_curves_one_panel_per_method_one_entry_per_run(lookalikes):
    from lmdistill.glue.plots import loss_curves_figure

    rows = build_rows(*collect([lookalikes]))
    fig = loss_curves_figure(rows)
    legends = _legends(fig)
    assert sorted(legends) == ["Distillation loss: minilm_v1", "Distillation loss: minilm_v2"]
    assert legends["Distillation loss: minilm_v2"] == [
        "2 (minilm, 4x384, 5 steps, final loss 0.5)",
        "distill/1 (minilm, 4x384, 4 steps, final loss 1)",
        "other/1 (bert-base, 4x384, 2 steps, final loss 3)",
    ]
    assert legends["Distillation loss: minilm_v1"] == ["0 (minilm, 3x384, 3 steps, final loss 2)"]
    panel = next(ax for ax in fig.axes if ax.get_title().endswith("minilm_v2"))
    curves = {line.get_label(): list(line.get_ydata()) for line in panel.get_lines()}
    assert curves["other/1 (bert-base, 4x384, 2 steps, final loss 3)"] == [4.0, 3.0]
    assert curves["2 (minilm, 4x384, 5 steps, final loss 0.5)"] == [4.0, 2.0, 1.0, 0.8, 0.5]


def test_score_plot_one_legend_entry_per_run(lookalikes):
    from lmdistill.glue.plots import score_vs_gflops_figure

    rows = build_rows(*collect([lookalikes]))
    (labels,) = _legends(score_vs_gflops_figure(rows)).values()
    assert len(labels) == len(set(labels)) == 3  # the scored rows with known GFLOPs
    assert labels == [
        "minilm_v1: 0 (minilm, 3x384, 3 steps, final loss 2)",
        "minilm_v2: 2 (minilm, 4x384, 5 steps, final loss 0.5)",
        "minilm_v2: distill/1 (minilm, 4x384, 4 steps, final loss 1)",
    ]


SUBNETS = {"L6-H768": (6, 768, 22.0, 0.70), "L4-H384": (4, 384, 5.0, 0.66),
           "L3-H192": (3, 192, 1.4, 0.58)}  # fmt: skip


def _subnet_family(run: Path, summary: bool, accuracies: dict[str, float] | None = None) -> None:
    """A method=ofa_minilm run (with or without its summary.json) whose ofa.export sub-networks
    were fine-tuned on RTE, the results in `run`/../finetune-<run name>/<sub-network>."""
    supernet = run / "student"
    supernet.mkdir(parents=True)
    if summary:
        _write(run / "summary.json", {
            "method": "ofa_minilm", "teacher": {"name_or_path": "/models/minilm", "layer": 6},
            "student": {"num_hidden_layers": 6, "hidden_size": 768, "params": 10, "gflops": 22.0},
            "steps": 7, "final_loss": 0.9, "export_dir": str(supernet),
        })  # fmt: skip
    for name, (layers, hidden, gflops, acc) in SUBNETS.items():
        acc = (accuracies or {}).get(name, acc)
        model = run / "subnets" / name
        _write(model / "lmdistill_provenance.json", {
            "method": "lmdistill.methods.ofa_minilm.OFAMiniLM", "teacher": "/models/minilm",
            "steps": 7, "supernet_dir": str(supernet),
            "subnet": {"num_hidden_layers": layers, "hidden_size": hidden, "gflops": gflops,
                       "params": layers * hidden},
        })  # fmt: skip
        shape = {"num_hidden_layers": layers, "hidden_size": hidden, "params": layers * hidden,
                 "gflops": gflops}  # fmt: skip
        _result(run.parent / f"finetune-{run.name}" / name, model, "rte", {"accuracy": acc},
                model_name=str(model), model_shape=shape)  # fmt: skip


@pytest.fixture
def families(runs) -> Path:
    """`runs` plus two once-for-all runs' sub-networks fine-tuned on RTE: `ofa` with its
    summary.json, `ofa-copied` without (its super-net's run directory name names the family)."""
    _subnet_family(runs / "ofa", summary=True)
    _subnet_family(runs / "ofa-copied", summary=False, accuracies={"L3-H192": 0.55})
    return runs


def test_subnetworks_form_one_family_per_supernet(families, tmp_path):
    rows = build_rows(*collect([families]))
    members = {(r.family, r.shape): r for r in rows if r.family is not None}
    assert sorted(members) == sorted(
        (family, f"{layers}x{hidden}")
        for family in ("ofa", "ofa-copied")
        for layers, hidden, _, _ in SUBNETS.values()
    )
    small = members[("ofa", "3x192")]
    assert (small.method, small.teacher, small.gflops, small.steps) == (
        "ofa_minilm", "/models/minilm", 1.4, 7)  # fmt: skip
    assert small.best("rte") == pytest.approx(58.0)
    assert members[("ofa-copied", "3x192")].method == "ofa_minilm"  # from the provenance
    assert all(r.family is None for r in rows if r.method.startswith("minilm"))
    files = make_report([families], tmp_path / "report")
    with open(files["report.csv"], newline="") as f:
        records = list(csv.DictReader(f))
    assert sorted(r["family"] for r in records if r["family"]) == ["ofa"] * 3 + ["ofa-copied"] * 3
    markdown = files["report.md"].read_text()
    lines = [x for x in markdown.splitlines() if x.startswith("| ") and "| 3x192 |" in x]
    families_column = sorted(x.split(" | ")[6] for x in lines)  # in both tables (a grid on v1)
    assert families_column == ["ofa", "ofa", "ofa-copied", "ofa-copied"]


def test_score_plot_one_curve_per_family_plain_points_otherwise(families):
    from lmdistill.glue.plots import score_vs_gflops_figure

    rows = build_rows(*collect([families]))
    (ax,) = score_vs_gflops_figure(rows).axes
    curves = [line for line in ax.get_lines() if line.get_linestyle() != "None"]
    assert sorted(line.get_label() for line in curves) == [
        "ofa_minilm family ofa (3 sub-networks)",
        "ofa_minilm family ofa-copied (3 sub-networks)",
    ]
    for line in curves:  # through the sub-networks in order of GFLOPs
        assert list(line.get_xdata()) == [1.4, 5.0, 22.0]
    copied = next(line for line in curves if "ofa-copied" in line.get_label())
    assert list(copied.get_ydata()) == pytest.approx([55.0, 66.0, 70.0])
    points = [line for line in ax.get_lines() if line.get_linestyle() == "None"]
    assert len(points) == 2 and all(len(line.get_xdata()) == 1 for line in points)  # v1, v2
    assert sorted(t.get_text() for t in ax.texts) == sorted(["6x768", "4x384", "3x192"] * 2)


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
    for name in (
        "report.md",
        "report.csv",
        "score_vs_gflops.png",
        "loss_curves.png",
        "quality_curves.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("score_vs_gflops.png", "loss_curves.png", "quality_curves.png"):
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


_IPYTHON_STUB = """
shown = []
class Markdown(str): pass
class Image:
    def __init__(self, filename): self.filename = filename
def display(obj): shown.append(obj)
"""


def test_notebook_runs_from_the_notebooks_folder(lookalikes, tmp_path, cache_dir):
    """Its code cells, in order, in `<project>/notebooks` as Jupyter starts it, on the project's
    `multirun/`; IPython's display is stubbed when Jupyter (the notebook extra) is absent."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(lookalikes, project / "multirun")
    (project / "notebooks").mkdir()
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    script = "\n\n".join("".join(c["source"]) for c in cells)
    script = script.replace("\nframe\n", "\nprint(frame.shape)\n")  # a cell's displayed value
    display_import = "from IPython.display import Image, Markdown, display\n"
    assert display_import in script
    try:
        import IPython  # noqa: F401
    except ImportError:  # the notebook extra is not installed here
        script = script.replace(display_import, _IPYTHON_STUB)
    (project / "run_notebook.py").write_text(script + "\nprint('rows', len(rows))\n")
    env = cli_env(cache_dir, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(project / "run_notebook.py")],
                          cwd=project / "notebooks", env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"runs from: {project / 'multirun'}" in proc.stdout
    assert f"rows {len(EXPECTED_RUNS)}" in proc.stdout
    for name in ("report.md", "report.csv", "score_vs_gflops.png", "loss_curves.png"):
        assert (project / "reports" / name).stat().st_size > 0, name


def test_notebook_extra_is_optional():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["notebook"]
    assert any(d.startswith("jupyter") for d in extra) and any(
        d.startswith("pandas") for d in extra
    )
    assert not any(
        d.startswith(("jupyter", "ipykernel", "notebook")) for d in project["dependencies"]
    )
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "notebook" not in makefile  # `make install` stays lean


def test_a_teacher_assistant_run_names_its_original_teacher_and_the_assistant(tmp_path):
    """Stage 2 was taught by the assistant's export (its `teacher`); the row names the teacher
    the chain started from and the assistant's shape instead."""
    run = tmp_path / "ta"
    _distill_run(run, "minilm_v2", 3, 1.2, [2.0, 1.0], teacher="/cache/assistants/k1/student")
    summary = json.loads((run / "summary.json").read_text())
    summary["assistant"] = {"export_dir": "/cache/assistants/k1/student", "summary": {
        "teacher": {"name_or_path": "/hub/bert-base-uncased"},
        "student": {"num_hidden_layers": 12, "hidden_size": 384},
    }}  # fmt: skip
    _write(run / "summary.json", summary)
    (row,) = build_rows(*collect([tmp_path]))
    assert row.teacher == "/hub/bert-base-uncased via TA 12x384"
    line = next(x for x in to_markdown([row]).splitlines() if x.startswith("| ta "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["minilm_v2", "bert-base-uncased via TA 12x384", "3x384"]
