"""The teacher-assistant chain trains each stage exactly as a run of its own would, and one
checkpoint resumes it exactly in either stage (CLI runs on tiny models, precision 32, shared with
tests/test_assistant.py: tests/assistant_runs.py describes them).

Every run trains a 2 x 16 assistant for 3 steps, then a 1 x 16 student for 4 (global steps 0-2
and 3-6).
"""

import json
from pathlib import Path

import pytest
import torch
from assistant_runs import RESUME_AT
from cli_helpers import read_metrics
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def runs(assistant_runs):
    """chain, reused (its configuration again, a sweep job), plain1 and plain2 (the runs the chain stands for), and
    per resume point crash_<where> and resumed_<where> (tests/assistant_runs.py)."""
    return assistant_runs


def _assistant_dir(run: Path) -> Path:
    return Path(json.loads((run / "summary.json").read_text())["assistant"]["export_dir"])


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = _weights(a), _weights(b)
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=1e-6, msg=name)


def _losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    rows = read_metrics(run / "logs" / "metrics.csv")
    return {int(r["step"]): r[key] for r in rows if key in r}


def test_stage1_is_the_plain_run_of_the_assistant(runs):
    _assert_same_weights(_assistant_dir(runs["chain"]), runs["plain1"] / "student")
    assert _losses(runs["chain"], "assistant/train/loss") == pytest.approx(
        _losses(runs["plain1"]), rel=1e-6
    )


def test_stage2_is_the_plain_run_from_the_assistant(runs):
    _assert_same_weights(runs["chain"] / "student", runs["plain2"] / "student")
    chain = _losses(runs["chain"])
    assert sorted(chain) == [3, 4, 5, 6]  # global steps after the switch
    assert list(chain.values()) == pytest.approx(list(_losses(runs["plain2"]).values()), rel=1e-6)


def test_a_cached_assistant_starts_in_stage2_and_gives_the_same_student(runs):
    summary = json.loads((runs["reused"] / "summary.json").read_text())
    assert summary["assistant"]["reused"] and summary["steps"] == 4
    _assert_same_weights(runs["reused"] / "student", runs["chain"] / "student")
    assert sorted(_losses(runs["reused"])) == [0, 1, 2, 3]
    assert not any("assistant/train/loss" in r for r in read_metrics(
        runs["reused"] / "logs" / "metrics.csv"))  # fmt: skip


@pytest.mark.parametrize("where", RESUME_AT)
def test_one_checkpoint_resumes_exactly_in_either_stage(runs, where):
    step = RESUME_AT[where]
    resumed = json.loads((runs[f"resumed_{where}"] / "summary.json").read_text())
    assert resumed["resumes"][-1]["step"] == step and resumed["steps"] == 4
    assert resumed["resumes"][-1]["checkpoint"].startswith(str(runs[f"crash_{where}"]))
    _assert_same_weights(runs[f"resumed_{where}"] / "student", runs["chain"] / "student")
    _assert_same_weights(_assistant_dir(runs[f"resumed_{where}"]),
                         _assistant_dir(runs["chain"]))  # fmt: skip
    logged, full = ({**_losses(run), **_losses(run, "assistant/train/loss")}
                    for run in (runs[f"resumed_{where}"], runs["chain"]))  # fmt: skip
    assert sorted(logged) == list(range(step, 7))
    assert logged == pytest.approx({s: full[s] for s in logged}, rel=1e-6)


def test_the_checkpoint_names_the_chain(runs):
    checkpoint = torch.load(runs["chain"] / "checkpoints" / "last.ckpt", weights_only=True)
    chain = checkpoint["lmdistill_assistant_chain"]
    assert (chain["switch_step"], chain["trains_assistant"]) == (3, True)
    assert chain["assistant"]["max_steps"] == 3 and checkpoint["global_step"] == 7
    assert set(checkpoint["lmdistill"]["stages"]) == {"assistant", "student"}
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"stage1", "stage2"}


def test_callbacks_log_under_the_active_stage_prefix(tiny_teacher_dir, monkeypatch):
    """The chain is the trainer's module: what callbacks log through it (the STS-B probe) goes
    under the active stage's prefix, assistant/ in stage 1."""
    from types import SimpleNamespace

    import lightning as L

    from lmdistill.methods import MiniLMv2
    from lmdistill.methods.assistant_chain import TeacherAssistantChain
    from lmdistill.models import build_student, load_teacher

    teacher = load_teacher(tiny_teacher_dir)
    shape = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    stages = [MiniLMv2(teacher, build_student(teacher.config, num_hidden_layers=n, **shape),
                       relation_heads=4) for n in (2, 1)]  # fmt: skip
    chain = TeacherAssistantChain(*stages, switch_step=3, student_steps=4, seed=0, stage2_rng={})
    logged = []
    monkeypatch.setattr(L.LightningModule, "log", lambda self, name, *a, **k: logged.append(name))
    for training, step, prefix in [(True, 0, "assistant/"), (True, 2, "assistant/"),
                                   (False, 3, "assistant/"), (True, 3, ""), (False, 7, "")]:  # fmt: skip
        chain._trainer = SimpleNamespace(training=training, global_step=step)
        assert chain.log_prefix == prefix
        chain.log("val/stsb_spearman", 0.5)
        assert logged[-1] == prefix + "val/stsb_spearman"
