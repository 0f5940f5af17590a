"""`ckpt_path=last`: continue the newest earlier run of the same configuration."""

import os
from pathlib import Path

from cli_helpers import TINY, check_ok, cli_env, read_metrics, run_cli, write_corpus
from wandb_offline import history


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
        "logger=[csv,wandb]",
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
    (first,) = (tmp_path / "first").glob("wandb/offline-run-*/run-*.wandb")
    (second,) = (tmp_path / "second").glob("wandb/offline-run-*/run-*.wandb")
    assert first.name == second.name  # run-<id>.wandb: the resumed run continues the same W&B run
    assert {key[1] for key in history(second)} == {2, 3, 4}


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


def test_launched_ddp_ranks_resume_from_rank_0s_checkpoint_not_the_index(tmp_path):
    """Rank 0 records its new run in the index before Lightning launches the other ranks, which
    run the command again: they must resume from rank 0's checkpoint, not from the index."""
    import pytest
    from omegaconf import OmegaConf

    from lmdistill.errors import UserError
    from lmdistill.runs import HANDOFF_ENV, handed_to_launched_ranks, record_run, resolve_ckpt_path

    cache, first, second = tmp_path / "cache", tmp_path / "first", tmp_path / "second"
    (first / "checkpoints").mkdir(parents=True)
    (first / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = OmegaConf.create({"ckpt_path": "last",
                            "paths": {"cache_dir": str(cache), "output_dir": str(second)}})  # fmt: skip
    record_run(cache, "key", first)
    rank0 = resolve_ckpt_path(cfg, "key")
    assert rank0 == str((first / "checkpoints" / "last.ckpt").resolve())
    record_run(cache, "key", second)  # rank 0's `fit`, before the other ranks start
    with pytest.raises(UserError, match="ckpt_path=last found no earlier run"):
        resolve_ckpt_path(cfg, "key")  # what a launched rank found without the hand-off
    with handed_to_launched_ranks("key", second, rank0):
        assert resolve_ckpt_path(cfg, "key") == rank0
        other_job = OmegaConf.merge(cfg, {"paths": {"output_dir": str(tmp_path / "third")}})
        with pytest.raises(UserError):
            resolve_ckpt_path(other_job, "key")  # only the job rank 0 runs is handed over
    assert HANDOFF_ENV not in os.environ
