"""Runs that end abruptly: SIGKILL then `ckpt_path=last` (bitwise the same losses), SIGTERM and
pre-emption signals (checkpoint, exit 143, resume in place), non-finite losses (skipped,
counted, then a clean stop with a checkpoint)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, check_ok, cli_env, pythonpath, read_metrics, step_losses, write_corpus

from lmdistill.safe_stop import EXIT_SIGNALLED

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("stop")
    write_corpus(path / "corpus.txt", documents=80)
    return path


def _args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", f"hydra.run.dir={out}",
            "+callbacks.record._target_=probes.RecordBatches", f"+callbacks.record.path={out}",
            *extra]  # fmt: skip


def _start(args: list[str], workdir: Path, cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmdistill.distill", *args], cwd=workdir,
        env=cli_env(cache_dir, PYTHONPATH=pythonpath(TESTS)), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _run(args, workdir, cache_dir) -> tuple[int, str, str]:
    proc = _start(args, workdir, cache_dir)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def _batches(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "batches_rank0.jsonl").read_text().splitlines()]


# --- SIGKILL, then ckpt_path=last ----------------------------------------------------------

KILL = ["trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=2"]


@pytest.fixture(scope="module")
def killed_and_resumed(workdir, cache_dir) -> tuple[Path, Path, Path]:
    """An uninterrupted run; the same run SIGKILLed after step 5 (last checkpoint: step 4);
    `ckpt_path=last`, which finds the killed run's checkpoint through the run index."""
    full, killed, resumed = workdir / "full", workdir / "killed", workdir / "resumed"
    check_ok(_run(_args(workdir, full, *KILL), workdir, cache_dir))
    kill = ["+callbacks.kill._target_=probes.SignalAtStep", "+callbacks.kill.step=5"]
    code, _, err = _run(_args(workdir, killed, *KILL, *kill), workdir, cache_dir)
    assert code == -signal.SIGKILL, err[-2000:]
    check_ok(_run(_args(workdir, resumed, *KILL, "ckpt_path=last"), workdir, cache_dir))
    return full, killed, resumed


def test_sigkill_then_ckpt_path_last_gives_bitwise_equal_losses(killed_and_resumed):
    full, killed, resumed = killed_and_resumed
    assert [b["step"] for b in _batches(killed)] == [0, 1, 2, 3, 4]
    expected = {b["step"]: b for b in _batches(full)}
    after = _batches(resumed)
    assert [b["step"] for b in after] == [4, 5, 6, 7]  # from the step-4 checkpoint on
    for b in after:  # the same batch (none repeated or skipped), the same float32 loss
        assert b["ids"] == expected[b["step"]]["ids"], b["step"]
        assert b["loss"] == expected[b["step"]]["loss"], b["step"]
    c, r = step_losses(full / "logs" / "metrics.csv"), step_losses(resumed / "logs" / "metrics.csv")
    assert all(r[s] == c[s] for s in range(4, 8))
    final = json.loads((resumed / "summary.json").read_text())
    assert final["tokens_seen"] == json.loads((full / "summary.json").read_text())["tokens_seen"]


def test_resumed_checkpoint_restores_optimizer_scheduler_and_rng(killed_and_resumed):
    full, _, resumed = killed_and_resumed
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for x, y in zip(a["optimizer_states"][0]["state"].values(),
                    b["optimizer_states"][0]["state"].values(), strict=True):  # fmt: skip
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert torch.equal(a["lmdistill"]["rng"][0]["torch"], b["lmdistill"]["rng"][0]["torch"])


# --- SIGTERM and pre-emption signals ---------------------------------------------------------


def _signal_when_training(proc: subprocess.Popen, out: Path, signum: int, after: int = 3) -> None:
    """Send `signum` once the run has trained `after` batches."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "batches_rank0.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= after:
            proc.send_signal(signum)
            return
        time.sleep(0.2)
    pytest.fail(f"the run did not reach {after} batches:\n{proc.stderr.read()[-3000:]}")


@pytest.fixture(scope="module")
def sigterm_run(workdir, cache_dir) -> tuple[Path, int, str]:
    out = workdir / "sigterm"
    proc = _start(_args(workdir, out, "trainer.max_steps=100000"), workdir, cache_dir)
    _signal_when_training(proc, out, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return out, proc.returncode, err


def test_sigterm_writes_a_checkpoint_at_the_step_boundary_and_exits(sigterm_run):
    out, code, err = sigterm_run
    assert code == EXIT_SIGNALLED, err[-3000:]
    trained = len(_batches(out))
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == trained  # every trained step is in it, no half step
    assert "SIGTERM at step" in (out / "distill.log").read_text()
    assert not (out / "student").exists() and not (out / "summary.json").exists()


def test_sigterm_checkpoint_is_saved_and_loaded_without_unpickling_warnings(sigterm_run):
    """Every checkpoint is saved with its full state asked for explicitly and loaded with
    `weights_only=True`: no "`weights_only` was not set, defaulting to `False`" on the way."""
    out, _, err = sigterm_run
    assert "weights_only" not in err, err[-3000:]
    assert "weights_only" not in (out / "distill.log").read_text()


def test_a_run_restarted_in_its_directory_continues_from_its_checkpoint(
    sigterm_run, workdir, cache_dir
):
    out, _, _ = sigterm_run
    stopped = len(_batches(out))
    first_record = (out / ".hydra" / "overrides.yaml").read_text()
    first_metrics = (out / "logs" / "metrics.csv").read_text()
    shorter = [f"trainer.max_steps={stopped + 2}", "resume.allow=[trainer.max_steps]"]
    check_ok(_run(_args(workdir, out, *shorter), workdir, cache_dir))
    steps = [b["step"] for b in _batches(out)]
    assert steps == [*range(stopped), stopped, stopped + 1]  # continued, nothing trained twice
    # metrics.csv continues: the first run's rows, then the restart's; its file is kept whole
    assert (out / "logs" / "metrics.until-restart-1.csv").read_text() == first_metrics
    logged = [
        int(r["step"]) for r in read_metrics(out / "logs" / "metrics.csv") if "train/loss" in r
    ]
    assert logged == [*range(stopped), stopped, stopped + 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == stopped + 2
    assert summary["resumes"][0]["allowed_differences"] == {
        "trainer.max_steps": [100000, stopped + 2]
    }
    # the first run's record is kept; the restart's is beside it
    assert (out / ".hydra" / "overrides.yaml").read_text() == first_record
    assert "trainer.max_steps=100000" in first_record
    resumed_record = (out / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert f"trainer.max_steps={stopped + 2}" in resumed_record


def test_preemption_signal_checkpoints_then_runs_the_schedulers_handler(workdir, cache_dir):
    """submitit installs a SIGUSR2 handler that requeues the job; it must run after the
    checkpoint is written, not in the middle of a step."""
    out, marker = workdir / "sigusr2", workdir / "requeued.txt"
    proc = _start(
        _args(workdir, out, "trainer.max_steps=100000",
              "+callbacks.handler._target_=probes.MarkerHandler", f"+callbacks.handler.path={marker}"),
        workdir, cache_dir,
    )  # fmt: skip
    _signal_when_training(proc, out, signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGNALLED, err[-3000:]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == len(_batches(out))
    assert marker.read_text() == f"SIGUSR2 at {checkpoint['global_step']}\n"
    assert "SIGUSR2 at step" in (out / "distill.log").read_text()


# --- non-finite losses -------------------------------------------------------------------------


def test_nonfinite_losses_are_skipped_and_counted(workdir, cache_dir):
    out = workdir / "nan_skipped"
    nan = ["+callbacks.nan._target_=probes.NanLossAtSteps", "+callbacks.nan.steps=[2,3]"]
    check_ok(_run(_args(workdir, out, "trainer.max_steps=6", *nan), workdir, cache_dir))
    batches = _batches(out)
    assert [b["loss"] != b["loss"] for b in batches] == [False, False, True, True, False, False]
    rows = read_metrics(out / "logs" / "metrics.csv")
    assert max(r.get("train/nonfinite_steps", 0) for r in rows) == 2
    assert all(r["train/loss"] == r["train/loss"] for r in rows if "train/loss" in r)  # no NaN


def test_too_many_nonfinite_losses_stop_with_one_line_and_a_usable_checkpoint(workdir, cache_dir):
    out = workdir / "nan_stop"
    nan = ["+callbacks.nan._target_=probes.NanLossAtSteps", "+callbacks.nan.from_step=3",
           "optim.max_nonfinite_steps=2"]  # fmt: skip
    code, _, err = _run(_args(workdir, out, "trainer.max_steps=50", *nan), workdir, cache_dir)
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("lmdistill: error:")]
    assert len(lines) == 1 and "not finite for 2 steps in a row" in lines[0], err[-3000:]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert checkpoint["lmdistill"]["nonfinite_steps"] == 2
