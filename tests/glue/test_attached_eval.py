"""lmdistill-distill eval=glue: the exported tiny student fine-tuned on tiny GLUE files right after
distillation; scores in summary.json, a restart that finishes only missing points, refusals, the
report's columns, and a teacher assistant's scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import TINY, check_ok, compose_distill, run_cli, write_corpus
from glue_files import write_glue

from lmdistill.errors import UserError

POINTS = ["lr0.0001-ep1-seed42", "lr3e-05-ep1-seed42"]  # eval.lrs x eval.epochs x eval.seeds
EVAL = ["eval=glue", "eval.tasks=[stsb,rte]", "eval.lrs=[1e-4,3e-5]", "eval.epochs=[1]",
        "eval.batch_size=4"]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, cache_dir):
    """One tiny distillation (2 steps) with GLUE attached, logged to W&B (offline): (work dir,
    run dir, CLI args)."""
    work = tmp_path_factory.mktemp("attached")
    corpus = write_corpus(work / "corpus.txt")
    glue = write_glue(work / "glue", rows=8)
    run = work / "run"
    args = [*TINY, f"data.paths=[{corpus}]", "trainer.max_steps=2", *EVAL, "logger=[csv,wandb]",
            f"eval.glue_dir={glue}", f"hydra.run.dir={run}"]  # fmt: skip
    check_ok(run_cli(args, work, cache_dir))
    return work, run, args


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _points(run: Path, task: str, under: str = "eval") -> dict[str, dict]:
    return {p.parent.name: _read(p) for p in sorted((run / under / task).glob("*/results.json"))}


def test_summary_holds_the_best_score_of_the_grid(evaluated):
    _, run, _ = evaluated
    summary = _read(run / "summary.json")
    for task, metric in (("stsb", "mean of pearson and spearman"), ("rte", "accuracy")):
        points = _points(run, task)
        assert sorted(points) == POINTS
        entry = summary["glue"][task]
        assert entry["metric"] == metric
        assert entry["score"] == max(r["score"] for r in points.values())
        chosen = points[f"lr{entry['lr']:g}-ep{entry['epochs']}-seed{entry['seed']}"]
        assert (entry["score"], entry["metrics"]) == (chosen["score"], chosen["metrics"])
        assert sorted(p["score"] for p in entry["grid"]) == sorted(
            r["score"] for r in points.values()
        )
        for result in points.values():  # the eval.* settings reached every fine-tune
            assert result["model"] == summary["export_dir"] == str(run / "student")
            assert (result["batch_size"], result["epochs"], result["train_examples"]) == (4, 1, 8)
            values = list(result["metrics"].values())
            assert result["score"] == pytest.approx(sum(values) / len(values))
        assert (run / "eval" / task / POINTS[0] / "logs" / "metrics.csv").is_file()
    stsb = [r["score"] for r in _points(run, "stsb").values()]
    assert stsb[0] != stsb[1]  # the two learning rates differ: the best is a real choice
    tasks = [summary["glue"][t]["score"] for t in ("stsb", "rte")]
    assert summary["glue"]["average"] == pytest.approx(sum(tasks) / 2)


def test_the_jobs_wandb_run_gets_the_scores(evaluated):
    from wandb_offline import history_keys, read_offline_summary

    _, run, _ = evaluated
    glue = _read(run / "summary.json")["glue"]
    first = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))[0]  # the distillation's own run
    logged = read_offline_summary(first)
    assert {k: v for k, v in logged.items() if k.startswith("glue/")} == {
        "glue/stsb": glue["stsb"]["score"], "glue/rte": glue["rte"]["score"],
        "glue/average": glue["average"],
    }  # fmt: skip
    assert "train/loss" in history_keys(first)  # the distillation's own run


def test_report_shows_the_scores_beside_the_run(evaluated):
    from lmdistill.report import make_report

    work, run, _ = evaluated
    summary = _read(run / "summary.json")
    files = make_report([run], out=work / "report")
    (row,) = files["rows"]  # the grid's results.json files are not rows of their own
    assert (row.method, row.shape, row.params) == (
        "minilm_v2",
        "2x32",
        summary["student"]["params"],
    )
    for task in ("stsb", "rte"):
        expected = sorted(100 * r["score"] for r in _points(run, task).values())
        assert sorted(row.scores[task]) == expected
    table = files["report.md"].read_text()
    assert "| GFLOPs | stsb | rte | average |" in table
    stsb, rte = (100 * summary["glue"][t]["score"] for t in ("stsb", "rte"))
    assert f"| {stsb:.1f} | {rte:.1f} | {(stsb + rte) / 2:.1f} |" in table


def test_a_restart_fine_tunes_only_the_missing_points(evaluated, cache_dir):
    work, run, args = evaluated
    missing = run / "eval" / "rte" / POINTS[1] / "results.json"
    missing.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (run / "eval").rglob("results.json")}
    steps = _read(run / "summary.json")["steps"]
    check_ok(run_cli(args, work, cache_dir))  # same directory: resumes its own last.ckpt
    assert missing.is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the finished points were not re-run
    summary = _read(run / "summary.json")
    assert summary["steps"] == steps
    assert summary["glue"]["rte"]["score"] == max(r["score"] for r in _points(run, "rte").values())
    # nothing was trained, so no W&B run was open: the scores go to the distillation's, resumed
    from wandb_offline import read_offline_summary

    first, resumed = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert resumed.name == first.name  # run-<id>.wandb: the same W&B run
    logged = read_offline_summary(resumed)
    assert {k: v for k, v in logged.items() if k.startswith("glue/")} == {
        "glue/stsb": summary["glue"]["stsb"]["score"], "glue/rte": summary["glue"]["rte"]["score"],
        "glue/average": summary["glue"]["average"],
    }  # fmt: skip


def test_ckpt_path_last_evaluates_the_finished_run_in_its_own_directory(evaluated, cache_dir):
    work, run, args = evaluated
    missing = run / "eval" / "stsb" / POINTS[0] / "results.json"
    missing.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (run / "eval").rglob("results.json")}
    elsewhere = work / "elsewhere"
    check_ok(run_cli([*args, "ckpt_path=last", f"hydra.run.dir={elsewhere}"], work, cache_dir))
    assert missing.is_file()  # finished where the run's other points are
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert not (elsewhere / "eval").exists() and not (elsewhere / "summary.json").exists()
    summary = _read(run / "summary.json")
    assert summary["glue"]["stsb"]["score"] == max(
        r["score"] for r in _points(run, "stsb").values()
    )


def test_a_point_with_other_settings_is_refused(evaluated):
    from lmdistill.finetune import FinetuneSettings
    from lmdistill.glue.attached import finished_point

    _, run, _ = evaluated
    point = run / "eval" / "stsb" / POINTS[0]
    recorded = _read(point / "results.json")
    assert finished_point(point, FinetuneSettings(**recorded["settings"])) == recorded
    other = FinetuneSettings(**{**recorded["settings"], "batch_size": 8, "train_limit": 4})
    with pytest.raises(UserError, match=r"other settings \(batch_size, train_limit\); run in a"):
        finished_point(point, other)
    assert _read(point / "results.json") == recorded


def test_unknown_task_is_one_line_before_distillation(tmp_path, cache_dir):
    out = tmp_path / "out"
    args = [*TINY, "eval=glue", "eval.tasks=[rte,mrcp]", f"hydra.run.dir={out}"]
    code, _, stderr = run_cli(args, tmp_path, cache_dir)
    assert code == 2, stderr
    assert stderr.strip() == (
        "lmdistill: error: eval.tasks=[rte,mrcp] names no GLUE task ('mrcp'); use some of cola, "
        "sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, e.g. eval.tasks=[rte,mrpc]"
    )
    assert not (out / "student").exists() and not (out / "summary.json").exists()


REFUSED = {
    "export=false": "eval=glue fine-tunes the exported student, but export=false; set "
    "export=true or drop eval=glue",
    "eval.glue_dir=/nonexistent/glue": "eval.glue_dir /nonexistent/glue does not exist; point it "
    "at a folder of GLUE TSV files (CoLA/, RTE/, ...) or set eval.glue_dir=null to use the hub",
    "eval.lrs=[1e-4,-1]": "eval.lrs=[0.0001,-1] must be a positive number; e.g. "
    "eval.lrs=[1e-4,5e-5]",
    "eval.epochs=[0]": "eval.epochs=[0] must be a positive integer; e.g. eval.epochs=[3]",
    "eval.tasks=[]": "eval.tasks=[] is empty; use some of cola, sst2, mrpc, stsb, qqp, mnli, "
    "qnli, rte, wnli, e.g. eval.tasks=[rte,mrpc]",
    "eval.select=middle": "eval.select=middle must be best or last; e.g. eval.select=best",
    # it used to distil, then fail to load the super-net as a classifier
    "method=ofa_minilm": "eval=glue fine-tunes the exported student, but method=ofa_minilm "
    "exports a super-net, which no classifier loads; drop eval=glue and fine-tune its "
    "sub-networks (ofa.export) with lmdistill-finetune",
}


@pytest.mark.parametrize("override", sorted(REFUSED))
def test_bad_eval_settings_are_refused(override, cache_dir):
    from lmdistill.config_checks import check_config

    with pytest.raises(UserError) as info:
        check_config(compose_distill([*TINY, "eval=glue", override]))
    assert str(info.value) == REFUSED[override]


def test_a_task_without_its_files_is_refused_before_distilling(tmp_path, cache_dir):
    """write_glue has no QQP: the check names its first missing file, before anything runs."""
    from lmdistill.config_checks import check_config

    glue = write_glue(tmp_path / "glue", rows=8)
    cfg = compose_distill([*TINY, "eval=glue", "eval.tasks=[rte,qqp]", f"eval.glue_dir={glue}"])
    with pytest.raises(UserError, match=r"QQP/train\.tsv is missing; put the GLUE QQP files"):
        check_config(cfg)
    check_config(compose_distill([*TINY, "eval=glue", "eval.tasks=[rte,mrpc]",
                                  f"eval.glue_dir={glue}"]))  # fmt: skip


def test_teacher_assistant_is_evaluated_too(tmp_path, tiny_teacher_dir, cache_dir):
    """In-process on a summary as run_with_assistant returns it: both models' scores, the
    assistant's own report row."""
    from omegaconf import open_dict

    from lmdistill.glue.attached import evaluate_run
    from lmdistill.report import make_report

    glue = write_glue(tmp_path / "glue", rows=8)
    run = tmp_path / "run"
    student, assistant = (shutil.copytree(tiny_teacher_dir, tmp_path / n) for n in "SA")
    shape = {"num_hidden_layers": 2, "hidden_size": 32, "params": 1000, "gflops": 0.01}
    summary = {
        "method": "minilm_v2", "teacher": {"name_or_path": "tiny"}, "student": shape,
        "steps": 4, "export_dir": str(student),
        "assistant": {"export_dir": str(assistant),
                      "summary": {"method": "minilm_v1", "student": {**shape, "params": 2000}}},
    }  # fmt: skip
    cfg = compose_distill([*TINY, "eval=glue", "eval.tasks=[rte]", "eval.lrs=[1e-4]",
                           "eval.epochs=[1]", "eval.batch_size=4", f"eval.glue_dir={glue}"])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    evaluate_run(cfg, summary)
    written = _read(run / "summary.json")
    (own,) = _points(run, "rte").values()
    (theirs,) = _points(run, "rte", under="eval/assistant").values()
    assert (own["model"], theirs["model"]) == (str(student), str(assistant))
    assert written["glue"]["rte"]["score"] == own["score"]
    assert written["assistant"]["glue"]["rte"]["score"] == theirs["score"]
    rows = {r.run: r for r in make_report([run], out=tmp_path / "report")["rows"]}
    assert sorted(rows) == ["run", "stage1_assistant"]
    assert rows["stage1_assistant"].scores == {"rte": [100 * theirs["score"]]}
    assert (rows["stage1_assistant"].method, rows["stage1_assistant"].params) == ("minilm_v1", 2000)
    assert rows["run"].scores == {"rte": [100 * own["score"]]}


def test_a_rerun_with_other_tasks_keeps_the_earlier_tasks(tmp_path, tiny_teacher_dir, cache_dir,
                                                          caplog):  # fmt: skip
    """Re-run in place with other eval.tasks: summary.json keeps the earlier task's points of
    this export (read, not trained again), but not a point of another model or one older than
    the export."""
    import os

    from omegaconf import open_dict

    from lmdistill.glue.attached import evaluate_run
    from lmdistill.report import make_report

    glue = write_glue(tmp_path / "glue", rows=8)
    run = tmp_path / "run"
    student = shutil.copytree(tiny_teacher_dir, tmp_path / "S")

    def evaluate(tasks: str, lrs: str) -> dict:
        cfg = compose_distill([*TINY, "eval=glue", f"eval.tasks={tasks}", f"eval.lrs={lrs}",
                               "eval.epochs=[1]", "eval.batch_size=4", f"eval.glue_dir={glue}"])  # fmt: skip
        with open_dict(cfg):
            cfg.paths.output_dir = str(run)
        return evaluate_run(cfg, {"method": "minilm_v2", "export_dir": str(student)})

    first = evaluate("[rte]", "[1e-4,3e-5]")["glue"]
    kept = {p: p.stat().st_mtime_ns for p in (run / "eval").rglob("results.json")}
    second = evaluate("[stsb]", "[1e-4]")
    assert sorted(second["glue"]) == ["average", "rte", "stsb"]
    assert second["glue"]["rte"] == first["rte"]  # its grid of two points, read back
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    (stsb,) = _points(run, "stsb").values()
    assert second["glue"]["stsb"]["score"] == stsb["score"]
    assert second["glue"]["average"] == pytest.approx((stsb["score"] + first["rte"]["score"]) / 2)
    assert _read(run / "summary.json")["glue"] == second["glue"]
    (row,) = make_report([run], out=tmp_path / "report")["rows"]
    assert sorted(row.scores) == ["rte", "stsb"]

    other = run / "eval" / "mrpc" / "other-model" / "results.json"  # another model's fine-tune
    other.parent.mkdir(parents=True)
    recorded = _read(next((run / "eval" / "stsb").glob("*/results.json")))
    other.write_text(json.dumps({**recorded, "settings": {**recorded["settings"], "model": "x"}}))
    old = next((run / "eval" / "rte").glob("*/results.json"))
    os.utime(old, ns=(0, 0))  # older than the export: not a result of this export
    third = evaluate("[stsb]", "[1e-4]")["glue"]
    assert sorted(third) == ["average", "rte", "stsb"]
    assert [p["results"] for p in third["rte"]["grid"]] == [
        p["results"] for p in first["rte"]["grid"] if p["results"] != str(old.relative_to(run))
    ]
    assert (
        f"left out of summary.json's glue: {other} is not a fine-tune of {student}" in caplog.text
    )
    assert f"{old} is older than the student" in caplog.text
