"""Teacher-assistant distillation through the real CLI, on tiny models (the runs are shared with
tests/test_assistant_chain.py: tests/assistant_runs.py describes them)."""

import json
import os
from pathlib import Path

import pytest
from assistant_runs import SEED, summary
from cli_helpers import read_metrics


@pytest.fixture(scope="module")
def ta(assistant_runs):
    """chain trains both stages; reused repeats it; C1 and C2 are the two jobs with another seed
    (1 and 2 layers); D crashes in stage 2 after its step-2 checkpoint and E (D's configuration)
    continues it; F is a MiniMoE student behind chain's assistant."""
    return assistant_runs


def test_both_stages_run_in_one_fit_in_the_run_directory(ta):
    top = summary(ta["chain"])
    stage1 = ta["chain"] / "stage1_assistant"
    assert stage1.is_symlink() and (stage1 / "student" / "config.json").is_file()
    assert (stage1 / "summary.json").is_file()  # the assistant's own summary, in the cache
    assert (ta["chain"] / "student" / "config.json").is_file()
    assert (ta["chain"] / "checkpoints" / "last.ckpt").is_file()  # both stages
    metrics = read_metrics(ta["chain"] / "logs" / "metrics.csv")
    assert {int(r["step"]) for r in metrics if "assistant/train/loss" in r} == {0, 1, 2}
    assert {int(r["step"]) for r in metrics if "train/loss" in r} == {3, 4, 5, 6}
    logged = [(int(r["step"]), k) for r in metrics for k in r if k not in ("step", "epoch")]
    assert len(logged) == len(set(logged))  # each metric once a step, the switch's step too
    before_switch = {k for step, k in logged if step < 3 and not k.startswith("lr-")}
    assert all(k.startswith("assistant/") for k in before_switch), before_switch
    assert top["export_dir"] == str(ta["chain"] / "student")
    assert top["assistant"]["export_dir"] == str(stage1.resolve() / "student")
    assert top["assistant"]["summary"] == summary(stage1)
    assert top["steps"] == 4 and top["assistant"]["summary"]["steps"] == 3
    # default assistant: the teacher's depth (2), the student's width (16)
    shape = top["assistant"]["summary"]["student"]
    assert (shape["num_hidden_layers"], shape["hidden_size"]) == (2, 16)
    assert (top["student"]["num_hidden_layers"], top["student"]["hidden_size"]) == (1, 16)


def test_stage2_teacher_is_the_assistant_export(ta):
    provenance = json.loads((ta["chain"] / "student" / "lmdistill_provenance.json").read_text())
    assistant = summary(ta["chain"])["assistant"]["export_dir"]
    assert provenance["teacher"] == assistant and provenance["teacher_layer"] == 2  # its last layer
    first = json.loads(
        (ta["chain"] / "stage1_assistant" / "student" / "lmdistill_provenance.json").read_text()
    )
    assert first["teacher"].endswith("tiny-bert-v2")


def test_wandb_one_run_per_job(ta):
    runs = list(ta["chain"].glob("**/wandb/offline-run-*"))
    assert len(runs) == 1


def test_finished_assistant_is_reused_and_a_changed_setting_retrains(ta):
    a, b = (summary(ta[n])["assistant"] for n in ("chain", "reused"))
    assert not a["reused"] and b["reused"] and b["cache_key"] == a["cache_key"]
    assert (ta["reused"] / "stage1_assistant").resolve() == (
        ta["chain"] / "stage1_assistant"
    ).resolve()


def test_sweep_jobs_share_one_assistant(ta):
    first, second = (summary(ta[n]) for n in ("C1", "C2"))
    assert first["seed"] == second["seed"] == 1 != SEED
    assert first["student"]["num_hidden_layers"] != second["student"]["num_hidden_layers"]
    first, second = first["assistant"], second["assistant"]
    assert not first["reused"]
    assert first["cache_key"] != summary(ta["chain"])["assistant"]["cache_key"]
    assert second["reused"] and second["cache_key"] == first["cache_key"]  # seed is in the key


def test_interrupted_stage2_resumes(ta):
    e = summary(ta["E"])
    # the 2 x 16 assistant of chain serves this 2 x 16 student too
    assert e["assistant"]["reused"] and e["student"]["num_hidden_layers"] == 2
    assert e["assistant"]["cache_key"] == summary(ta["chain"])["assistant"]["cache_key"]
    assert e["steps"] == 4
    steps = sorted(
        {
            int(r["step"])
            for r in read_metrics(ta["E"] / "logs" / "metrics.csv")
            if "train/loss" in r
        }
    )
    assert steps == [2, 3]  # continued from D's step-2 checkpoint, not from scratch
    assert e["resumes"][-1]["checkpoint"] == str(ta["D"] / "checkpoints" / "last.ckpt")
    assert not (ta["D"] / "summary.json").exists()


def test_minimoe_student_behind_a_dense_assistant(ta):
    f = summary(ta["F"])
    assert (
        f["assistant"]["reused"]
        and f["assistant"]["cache_key"] == summary(ta["chain"])["assistant"]["cache_key"]
    )
    assert f["student"]["ffn_experts"] == 4
    config = json.loads((ta["F"] / "student" / "config.json").read_text())
    assert config["model_type"] == "lmdistill-minimoe"


def test_link_tolerates_a_link_another_rank_created_between_check_and_create(tmp_path, monkeypatch):
    """Two DDP ranks linking stage1_assistant at once: the slower one must not fail."""
    from lmdistill import assistant

    target = tmp_path / "entry"
    target.mkdir()
    link = tmp_path / "run" / assistant.STAGE1_DIR
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)  # the other rank's, made "just now"
    monkeypatch.setattr(Path, "exists", lambda self: False)  # our check ran before it existed
    monkeypatch.setattr(Path, "is_symlink", lambda self: False)
    assistant._link(link, target)
    assert os.readlink(link) == str(target)
