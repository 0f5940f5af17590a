"""The teacher-assistant chain trains each stage exactly as a run of its own would, and one
checkpoint resumes it exactly in either stage (CLI runs on tiny models, precision 32).

Every run trains a 2 x 16 assistant for 3 steps, then a 1 x 16 student for 4 (global steps 0-2
and 3-6).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, check_ok, cli_env, read_metrics, run_cli, write_corpus
from safetensors.torch import load_file

SHAPE = ["student.num_hidden_layers=1", "student.hidden_size=16", "student.intermediate_size=32"]
CHAIN = ["assistant=default", *SHAPE, "assistant.max_steps=3", "trainer.max_steps=4"]
# last.ckpt after every step (such a run logs no losses: each step's are flushed into its
# checkpoint before they are logged); the crash ends the run after its step-(k - 1) checkpoint
CRASH = ["callbacks.model_checkpoint.every_n_train_steps=1",
         "+callbacks.crash._target_=crash_callback.CrashAtStep"]  # fmt: skip
# crash at the end of global step k - 1 (last.ckpt holds k - 1 steps): resume inside stage 1,
# exactly at the switch (step 3), inside stage 2
RESUME_AT = {"stage1": 1, "switch": 3, "stage2": 5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("chain")
    corpus = write_corpus(work / "corpus.txt")
    tests = str(Path(__file__).parent)
    env = cli_env(work, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))

    def cli(name, cache, *args):
        env["LMDISTILL_CACHE"] = str(work / cache)
        data = [*TINY, f"data.paths=[{corpus}]"]
        return run_cli([*data, *args, f"hydra.run.dir={work / name}"], work, work, env=env)

    check_ok(cli("chain", "cache", *CHAIN))
    check_ok(cli("reused", "cache", *CHAIN))  # the same command: the assistant from the cache
    assistant = _assistant_dir(work / "chain")
    # the two runs the chain stands for: teacher -> assistant, assistant -> student
    check_ok(cli("plain1", "plain", *SHAPE[1:], "trainer.max_steps=3"))
    check_ok(cli("plain2", "plain", *SHAPE, "trainer.max_steps=4",
                 f"teacher.name_or_path={assistant}"))  # fmt: skip
    for where, step in RESUME_AT.items():
        code, _, err = cli(
            f"crash_{where}", where, *CHAIN, *CRASH, f"+callbacks.crash.step={step + 1}"
        )
        assert code != 0 and "simulated crash" in err
        last = ["ckpt_path=last"] if where == "stage2" else []  # else: re-running continues it
        check_ok(cli(f"resumed_{where}", where, *CHAIN, *last))
    return work


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
    _assert_same_weights(_assistant_dir(runs / "chain"), runs / "plain1" / "student")
    assert _losses(runs / "chain", "assistant/train/loss") == pytest.approx(
        _losses(runs / "plain1"), rel=1e-6
    )


def test_stage2_is_the_plain_run_from_the_assistant(runs):
    _assert_same_weights(runs / "chain" / "student", runs / "plain2" / "student")
    chain = _losses(runs / "chain")
    assert sorted(chain) == [3, 4, 5, 6]  # global steps after the switch
    assert list(chain.values()) == pytest.approx(list(_losses(runs / "plain2").values()), rel=1e-6)


def test_a_cached_assistant_starts_in_stage2_and_gives_the_same_student(runs):
    summary = json.loads((runs / "reused" / "summary.json").read_text())
    assert summary["assistant"]["reused"] and summary["steps"] == 4
    _assert_same_weights(runs / "reused" / "student", runs / "chain" / "student")
    assert sorted(_losses(runs / "reused")) == [0, 1, 2, 3]
    assert not any("assistant/train/loss" in r for r in read_metrics(
        runs / "reused" / "logs" / "metrics.csv"))  # fmt: skip


@pytest.mark.parametrize("where", RESUME_AT)
def test_one_checkpoint_resumes_exactly_in_either_stage(runs, where):
    step = RESUME_AT[where]
    resumed = json.loads((runs / f"resumed_{where}" / "summary.json").read_text())
    assert resumed["resumes"][-1]["step"] == step and resumed["steps"] == 4
    assert resumed["resumes"][-1]["checkpoint"].startswith(str(runs / f"crash_{where}"))
    _assert_same_weights(runs / f"resumed_{where}" / "student", runs / "chain" / "student")
    _assert_same_weights(_assistant_dir(runs / f"resumed_{where}"),
                         _assistant_dir(runs / "chain"))  # fmt: skip
    logged, full = ({**_losses(run), **_losses(run, "assistant/train/loss")}
                    for run in (runs / f"resumed_{where}", runs / "chain"))  # fmt: skip
    assert sorted(logged) == list(range(step, 7))
    assert logged == pytest.approx({s: full[s] for s in logged}, rel=1e-6)


def test_the_checkpoint_names_the_chain(runs):
    checkpoint = torch.load(runs / "chain" / "checkpoints" / "last.ckpt", weights_only=True)
    chain = checkpoint["lmdistill_assistant_chain"]
    assert (chain["switch_step"], chain["trains_assistant"]) == (3, True)
    assert chain["assistant"]["max_steps"] == 3 and checkpoint["global_step"] == 7
    assert set(checkpoint["lmdistill"]["stages"]) == {"assistant", "student"}
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"stage1", "stage2"}
