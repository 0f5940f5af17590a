"""`ckpt_path=last`: continue the newest earlier run of the same configuration."""

import os
from pathlib import Path

from cli_helpers import TINY, check_ok, cli_env, read_metrics, run_cli, write_corpus


def test_ckpt_path_last_continues_an_interrupted_run(tmp_path):
    cache = tmp_path / "cache"
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = cli_env(
        cache, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    args = [
        *TINY,
        f"data.paths=[{corpus}]",
        "trainer.max_steps=5",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    crash = ["+callbacks.crash._target_=crash_callback.CrashAtStep", "+callbacks.crash.step=3"]
    code, _, err = run_cli(
        [*args, *crash, f"hydra.run.dir={tmp_path / 'first'}"], tmp_path, cache, env=env
    )
    assert code != 0 and "simulated crash" in err
    check_ok(
        run_cli(
            [*args, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'second'}"],
            tmp_path,
            cache,
            env=env,
        )
    )
    steps = sorted(
        {
            int(r["step"])
            for r in read_metrics(tmp_path / "second" / "logs" / "metrics.csv")
            if "train/loss" in r
        }
    )
    assert steps == [2, 3, 4]  # from the first run's step-2 checkpoint


def test_ckpt_path_last_without_an_earlier_run_is_a_user_error(tmp_path):
    cache = tmp_path / "cache"
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = [
        *TINY,
        f"data.paths=[{corpus}]",
        "trainer.max_steps=2",
        "ckpt_path=last",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    code, _, err = run_cli(args, tmp_path, cache)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(
        "lmdistill: error: ckpt_path=last found no earlier run"
    )
