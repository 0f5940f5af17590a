"""Teacher-assistant distillation through the real CLI, on tiny models."""

import json
import os
from pathlib import Path

import pytest
from cli_helpers import TINY, check_ok, cli_env, read_metrics, run_cli, write_corpus

# a 1 x 16 student of the 2 x 32 tiny teacher: the assistant is 2 x 16
SHAPE = ["student.num_hidden_layers=1", "student.hidden_size=16", "student.intermediate_size=32"]
ASSISTANT_STEPS = "assistant.max_steps=3"


@pytest.fixture(scope="module")
def ta(tmp_path_factory):
    """Runs sharing one cache: A trains both stages, B repeats A, C is a two-student sweep with
    another seed, D crashes in stage 2 after its step-2 checkpoint, E re-runs D's command."""
    work = tmp_path_factory.mktemp("ta")
    cache = work / "cache"
    corpus = write_corpus(work / "corpus.txt")
    env = cli_env(
        cache,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )
    base = [*TINY, "assistant=default", *SHAPE, ASSISTANT_STEPS, f"data.paths=[{corpus}]"]

    def cli(name, *extra):
        return run_cli([*base, *extra, f"hydra.run.dir={work / name}"], work, cache, env=env)

    check_ok(cli("A", "trainer.max_steps=4", "logger=[csv,wandb]"))
    check_ok(cli("B", "trainer.max_steps=4"))
    sweep = ["trainer.max_steps=4", "seed=1", "student.num_hidden_layers=1,2"]
    check_ok(run_cli(["-m", *base, *sweep, f"hydra.sweep.dir={work / 'C'}"], work, cache, env=env))
    resumable = ["trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=2"]
    crash = ["+callbacks.crash._target_=crash_callback.CrashAtStep", "+callbacks.crash.step=3"]
    code, _, err = cli("D", *resumable, "student.num_hidden_layers=2", *crash)
    assert code != 0 and "simulated crash at step 3" in err
    check_ok(cli("E", *resumable, "student.num_hidden_layers=2"))
    check_ok(cli("F", "trainer.max_steps=4", "method=minimoe", "assistant.method=minilm_v2"))
    return work


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_both_stages_run_in_one_fit_in_the_run_directory(ta):
    top = summary(ta / "A")
    stage1 = ta / "A" / "stage1_assistant"
    assert stage1.is_symlink() and (stage1 / "student" / "config.json").is_file()
    assert (stage1 / "summary.json").is_file()  # the assistant's own summary, in the cache
    assert (ta / "A" / "student" / "config.json").is_file()
    assert (ta / "A" / "checkpoints" / "last.ckpt").is_file()  # both stages
    metrics = read_metrics(ta / "A" / "logs" / "metrics.csv")
    assert {int(r["step"]) for r in metrics if "assistant/train/loss" in r} == {0, 1, 2}
    assert {int(r["step"]) for r in metrics if "train/loss" in r} == {3, 4, 5, 6}
    assert top["export_dir"] == str(ta / "A" / "student")
    assert top["assistant"]["export_dir"] == str(stage1.resolve() / "student")
    assert top["assistant"]["summary"] == summary(stage1)
    assert top["steps"] == 4 and top["assistant"]["summary"]["steps"] == 3
    # default assistant: the teacher's depth (2), the student's width (16)
    shape = top["assistant"]["summary"]["student"]
    assert (shape["num_hidden_layers"], shape["hidden_size"]) == (2, 16)
    assert (top["student"]["num_hidden_layers"], top["student"]["hidden_size"]) == (1, 16)


def test_stage2_teacher_is_the_assistant_export(ta):
    provenance = json.loads((ta / "A" / "student" / "lmdistill_provenance.json").read_text())
    assistant = summary(ta / "A")["assistant"]["export_dir"]
    assert provenance["teacher"] == assistant and provenance["teacher_layer"] == 2  # its last layer
    first = json.loads(
        (ta / "A" / "stage1_assistant" / "student" / "lmdistill_provenance.json").read_text()
    )
    assert first["teacher"].endswith("tiny-bert-v2")


def test_wandb_one_run_per_job(ta):
    runs = list((ta / "A").glob("**/wandb/offline-run-*"))
    assert len(runs) == 1


def test_finished_assistant_is_reused_and_a_changed_setting_retrains(ta):
    a, b = (summary(ta / n)["assistant"] for n in "AB")
    assert not a["reused"] and b["reused"] and b["cache_key"] == a["cache_key"]
    assert (ta / "B" / "stage1_assistant").resolve() == (ta / "A" / "stage1_assistant").resolve()


def test_sweep_jobs_share_one_assistant(ta):
    jobs = sorted(p for p in (ta / "C").iterdir() if (p / "summary.json").is_file())
    first, second = (summary(job)["assistant"] for job in jobs)
    assert len(jobs) == 2
    assert not first["reused"] and first["cache_key"] != summary(ta / "A")["assistant"]["cache_key"]
    assert second["reused"] and second["cache_key"] == first["cache_key"]  # seed is in the key


def test_interrupted_stage2_resumes(ta):
    e = summary(ta / "E")
    assert e["assistant"]["reused"]  # the 2 x 16 assistant of A serves this 2 x 16 student too
    assert e["steps"] == 5
    steps = sorted(
        {
            int(r["step"])
            for r in read_metrics(ta / "E" / "logs" / "metrics.csv")
            if "train/loss" in r
        }
    )
    assert steps == [2, 3, 4]  # continued from D's step-2 checkpoint, not from scratch
    assert e["resumes"][-1]["checkpoint"] == str(ta / "D" / "checkpoints" / "last.ckpt")
    assert not (ta / "D" / "summary.json").exists()


def test_minimoe_student_behind_a_dense_assistant(ta):
    f = summary(ta / "F")
    assert (
        f["assistant"]["reused"]
        and f["assistant"]["cache_key"] == summary(ta / "A")["assistant"]["cache_key"]
    )
    assert f["student"]["ffn_experts"] == 4
    config = json.loads((ta / "F" / "student" / "config.json").read_text())
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
