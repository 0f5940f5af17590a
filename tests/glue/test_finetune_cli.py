"""lmdistill-finetune end to end on tiny GLUE files with the tiny model (real CLI, subprocess)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_helpers import check_ok, run_cli
from glue_files import write_glue

COMMON = ["model=tiny", "epochs=1", "batch_size=4", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_teacher_dir):
    path = tmp_path_factory.mktemp("finetune")
    write_glue(path / "glue", rows=12)
    return path


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_tiny_finetune_writes_results(task, workdir, cache_dir):
    out = workdir / f"out_{task}"
    args = [*COMMON, f"task={task}", f"data.glue_dir={workdir / 'glue'}", f"hydra.run.dir={out}"]
    check_ok(run_cli(args, workdir, cache_dir, module="lmdistill.finetune", timeout=180))
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task
    names = {"rte": ["accuracy"], "stsb": ["pearson", "spearman"]}[task]
    assert sorted(results["metrics"]) == names
    assert all(-1.0 <= v <= 1.0 for v in results["metrics"].values())
    assert results["select"] == "best" and results["epoch"] == 1
    assert [h["epoch"] for h in results["history"]] == [1]  # numbered as `epoch`
    assert results["train_examples"] == 12 and results["dev_examples"] == {"dev": 12}
    assert (results["epochs"], results["batch_size"], results["lr"]) == (1, 4, 2e-5)
    assert results["model_shape"]["num_hidden_layers"] == 2
    assert results["model"].endswith("tiny-bert-v2")
    assert (out / "logs" / "metrics.csv").exists()


def test_a_finished_fine_tune_is_kept(workdir, cache_dir):
    """The same command in its directory again: not run again; other settings: refused in one
    line, its results.json and .hydra/ unchanged."""
    out = workdir / "out_rte"  # test_tiny_finetune_writes_results's run
    args = [*COMMON, "task=rte", f"data.glue_dir={workdir / 'glue'}", f"hydra.run.dir={out}"]
    if not (out / "results.json").is_file():  # this test alone
        check_ok(run_cli(args, workdir, cache_dir, module="lmdistill.finetune", timeout=180))
    files = [out / "results.json", *sorted((out / ".hydra").iterdir())]
    before = {p: p.read_bytes() for p in files}
    _, stdout, stderr = check_ok(
        run_cli(args, workdir, cache_dir, module="lmdistill.finetune", timeout=180)
    )
    assert "already fine-tuned" in stdout + stderr
    code, _, stderr = run_cli([*args, "lr=1e-4"], workdir, cache_dir, module="lmdistill.finetune")
    assert code == 2 and "holds a fine-tune with other settings" in stderr, stderr
    assert {p: p.read_bytes() for p in files} == before
    assert sorted((out / ".hydra").iterdir()) == files[1:]  # no second record either


def test_random_init_and_train_limit(workdir, cache_dir):
    out = workdir / "out_random"
    args = [*COMMON, "task=cola", "init=random", "data.train_limit=5", f"hydra.run.dir={out}"]
    args.append(f"data.glue_dir={workdir / 'glue'}")
    check_ok(run_cli(args, workdir, cache_dir, module="lmdistill.finetune", timeout=180))
    results = json.loads((out / "results.json").read_text())
    assert results["init"] == "random" and results["train_examples"] == 5
    assert list(results["metrics"]) == ["mcc"]


def _one_error_line(code: int, stderr: str, *words: str) -> str:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmdistill: error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_malformed_tsv_is_one_error_line(tmp_path, cache_dir, tiny_teacher_dir):
    glue = write_glue(tmp_path / "glue")
    path = glue / "RTE" / "train.tsv"
    path.write_text(path.read_text() + "99\tA sentence.\tAnother.\tperhaps\n")
    out = tmp_path / "out"
    args = [*COMMON, "task=rte", f"data.glue_dir={glue}", f"hydra.run.dir={out}"]
    code, _, stderr = run_cli(args, tmp_path, cache_dir, module="lmdistill.finetune", timeout=120)
    _one_error_line(code, stderr, str(path), "line 10", "unknown label 'perhaps'", "fix")
    assert not (out / "results.json").exists()


def _config(out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("finetune", overrides=[*COMMON, f"paths.output_dir={out}", *overrides])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("task=mrcp", r"^unknown task 'mrcp'; use one of cola, sst2"),
        ("model=/nonexistent/student", r"^model directory /nonexistent/student does not exist; "),
        ("data.glue_dir=/nonexistent/glue", r"^data.glue_dir /nonexistent/glue does not exist; "),
        ("init=zeros", r"^unknown init 'zeros'; use one of pretrained, random"),
    ],
)
def test_bad_arguments_raise_user_errors(override, pattern, tmp_path, cache_dir, tiny_teacher_dir):
    from lmdistill.errors import UserError, _as_user_error
    from lmdistill.finetune import run

    glue = write_glue(tmp_path / "glue")
    cfg = _config(tmp_path / "out", ["task=rte", f"data.glue_dir={glue}", override])
    with pytest.raises(Exception) as info:
        run(cfg)
    error = _as_user_error(info.value)
    assert isinstance(error, UserError), info.value
    assert re.search(pattern, str(error)), str(error)
    assert not (tmp_path / "out" / "results.json").exists()


def test_grid_multirun_feeds_the_report(workdir, cache_dir):
    """`-m +grid=paper` with the grid narrowed to two seeds; the report takes best and median."""
    from lmdistill.report import make_report

    sweep = workdir / "sweep"
    narrow = ["hydra.sweeper.params.lr=1e-4", "hydra.sweeper.params.batch_size=4"]
    narrow += ["hydra.sweeper.params.epochs=1", 'hydra.sweeper.params.seed="1,2"']
    args = ["-m", "+grid=paper", *COMMON, "task=wnli", f"data.glue_dir={workdir / 'glue'}"]
    args += [*narrow, f"hydra.sweep.dir={sweep}"]
    check_ok(run_cli(args, workdir, cache_dir, module="lmdistill.finetune", timeout=240))
    results = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert [(r["seed"], r["lr"], r["batch_size"]) for r in results] == [(1, 1e-4, 4), (2, 1e-4, 4)]
    (row,) = make_report([sweep])["rows"]
    scores = [100 * r["score"] for r in results]
    assert row.scores["wnli"] == scores
    assert row.best("wnli") == max(scores) and (sweep / "report.md").exists()
