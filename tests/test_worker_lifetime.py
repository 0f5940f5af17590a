"""A SIGKILLed run leaves no DataLoader worker behind (`lmdistill.worker_lifetime`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import TINY, cli_env, pythonpath, write_corpus

TESTS = Path(__file__).parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkilled_run_leaves_no_dataloader_worker(tmp_path, cache_dir):
    write_corpus(tmp_path / "corpus.txt", documents=80)
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("data.num_workers=")] + [
        "data.num_workers=1", f"data.paths=[{tmp_path / 'corpus.txt'}]",
        "trainer.max_steps=100000", f"hydra.run.dir={out}",
        "+callbacks.record._target_=probes.RecordBatches", f"+callbacks.record.path={out}",
        "+callbacks.busy._target_=resume_probes.BusyWorkers",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdistill.distill", *args], cwd=tmp_path,
        env=cli_env(cache_dir, PYTHONPATH=pythonpath(TESTS)), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        log = out / "batches_rank0.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        workers = _children(proc.pid)
        assert workers, "the run started no DataLoader worker"
        proc.kill()  # SIGKILL: no handler, no cleanup of its own
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # a bound for a slow machine, not a timing measure
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"workers {survivors} outlived their SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for worker in workers:  # never leave them behind, even when the test fails
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
        if proc.stderr:
            proc.stderr.close()


def test_worker_init_sets_the_death_signal_and_runs_the_loaders_function():
    """In a forked child, as in a DataLoader worker: PR_GET_PDEATHSIG is SIGKILL afterwards,
    and the loader's own worker_init_fn (Lightning's seeding) still runs."""
    import ctypes

    from lmdistill.worker_lifetime import die_with_parent

    calls: list[int] = []
    wrapped = die_with_parent(calls.append)
    assert die_with_parent(wrapped) is wrapped  # each new epoch's iterator: wrapped once
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        try:
            wrapped(3)
            value = ctypes.c_int(0)
            ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
            os.write(write, f"{value.value} {calls}".encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert os.read(read, 100).decode() == f"{int(signal.SIGKILL)} [3]"
    os.close(read)
