"""Checkpoint files: keep-last-k, atomic writes, and a clear error for a broken checkpoint.

One real 8-step run (module-scoped) provides the step checkpoints and a real last.ckpt; two CLI
runs resume from a truncated and an empty copy of it; the atomic-write cases run in-process.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, check_ok, cli_env, pythonpath, run_cli, write_corpus
from test_distill_errors import _assert_one_error_line, _assert_untouched, _prefill

from lmdistill.checkpoint_io import AtomicCheckpointIO, NoSpaceError

ATOMIC_PLUGIN = "++trainer.plugins=[{_target_:lmdistill.checkpoint_io.AtomicCheckpointIO}]"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("checkpoints")
    write_corpus(path / "corpus.txt")
    return path


@pytest.fixture(scope="module")
def keep_two(workdir, cache_dir) -> Path:
    """8 steps, a checkpoint every 2 steps, the 2 newest kept (written by AtomicCheckpointIO)."""
    out = workdir / "keep_two"
    check_ok(
        run_cli(
            [
                *TINY,
                f"data.paths=[{workdir / 'corpus.txt'}]",
                "trainer.max_steps=8",
                "callbacks.model_checkpoint.every_n_train_steps=2",
                "callbacks.model_checkpoint.save_top_k=2",
                ATOMIC_PLUGIN,
                f"hydra.run.dir={out}",
            ],  # fmt: skip
            workdir,
            cache_dir,
        )
    )
    return out


# --- keep-last-k --------------------------------------------------------------------------------


def test_save_top_k_keeps_the_newest_step_checkpoints(keep_two):
    files = sorted(p.name for p in (keep_two / "checkpoints").iterdir())
    assert len(files) == 3, files  # nothing else: no older steps, no temporary files
    assert "last.ckpt" in files
    steps = {}
    for name in files:
        if name != "last.ckpt":
            match = re.fullmatch(r"epoch=\d+-step=(\d+)\.ckpt", name)
            assert match, name
            steps[int(match[1])] = name
    assert sorted(steps) == [6, 8], files
    for step, name in steps.items():  # each file holds the state of the step it is named after
        checkpoint = torch.load(keep_two / "checkpoints" / name, weights_only=True)
        assert checkpoint["global_step"] == step
    last = torch.load(keep_two / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8


# --- a broken checkpoint is one clear line ------------------------------------------------------


def _broken_copy(source: Path, kind: str, folder: Path) -> Path:
    """The first half of a real checkpoint's bytes, or none of them."""
    data = source.read_bytes()
    target = folder / f"{kind}.ckpt"
    target.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"")
    return target


@pytest.mark.parametrize(
    "kind, words",
    [("truncated", ["truncated", "cut off"]), ("empty", ["empty", "0 bytes"])],
)
def test_broken_checkpoint_is_one_error_line(kind, words, keep_two, workdir, cache_dir):
    broken = _broken_copy(keep_two / "checkpoints" / "last.ckpt", kind, workdir)
    out = workdir / f"resume_{kind}"
    _prefill(out)
    args = [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", "trainer.max_steps=2"]
    args += [f"ckpt_path={broken}", f"hydra.run.dir={out}"]
    code, _, stderr = run_cli(args, workdir, cache_dir, timeout=120)
    line = _assert_one_error_line(code, stderr, str(broken), *words, "ckpt_path=", "older")
    assert "move it aside" in line  # what to do: an older checkpoint, or start over
    _assert_untouched(out)


# --- atomic writes ------------------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


def _half_then_fail(real_save):
    """A `torch.save` that writes half of the checkpoint to the file, then fails (disk full)."""

    def save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint(_state(1.0), path)
    monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    with pytest.raises(
        NoSpaceError, match=f"^no space left on {tmp_path}; the previous last.ckpt is intact"
    ):
        plugin.save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the half-written temporary file is gone
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the old one, complete
    plugin.save_checkpoint(_state(3.0), path)  # and the next save works
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # an ordinary file, not 0600


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_one_line_whatever_torch_raises(tmp_path, monkeypatch):
    """torch.save into a full disk raises RuntimeError `[enforce fail at inline_container.cc]
    ... unexpected pos` (the OSError ENOSPC only as its context); /dev/full fails like one."""
    path = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    real_save = torch.save

    def save_into_full_disk(obj, f, *args, **kwargs):
        with open("/dev/full", "wb") as full:
            real_save(obj, full, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_into_full_disk)
    with pytest.raises(NoSpaceError) as info:
        AtomicCheckpointIO().save_checkpoint(_state(1.0), path)
    chain, err = [], info.value.__cause__  # torch's errors are kept behind the one line
    while err is not None:
        chain.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    assert any("unexpected pos" in e for e in chain), chain
    assert str(info.value) == (
        f"no space left on {path.parent}; no epoch=0-step=2.ckpt was written: free space (or "
        "write elsewhere: paths.output_dir=...), then resume with ckpt_path=last"
    )
    assert os.listdir(path.parent) == []
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError, match="^x$"):  # other failures stay what they are
        AtomicCheckpointIO().save_checkpoint(_state(1.0), path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_during_training_is_one_line_and_keeps_last_ckpt(workdir, cache_dir):
    out = workdir / "disk_full"
    args = [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", "trainer.max_steps=6",
            "callbacks.model_checkpoint.every_n_train_steps=2", f"hydra.run.dir={out}",
            "+callbacks.full._target_=resume_probes.DiskFullFromStep", "+callbacks.full.step=3"]  # fmt: skip
    env = cli_env(cache_dir, PYTHONPATH=pythonpath(Path(__file__).parent))
    code, _, stderr = run_cli(args, workdir, cache_dir, env=env)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and "inline_container" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"lmdistill: error: no space left on {out / 'checkpoints'}; the previous last.ckpt is "
        "intact: free space (or write elsewhere: paths.output_dir=...), then resume with "
        "ckpt_path=last"
    ], stderr[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["last.ckpt"]  # no temporary file left
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (out / "summary.json").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL halfway through writing: last.ckpt is the old one; the next save tidies up."""
    path = tmp_path / "last.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint(_state(1.0), path)
    real_save = torch.save
    pid = os.fork()
    if pid == 0:  # the child writes half of the new checkpoint, then dies without cleaning up
        try:

            def save(obj, f, *args, **kwargs):
                real_save(obj, f, *args, **kwargs)
                f.flush()
                f.truncate(f.tell() // 2)
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save
            plugin.save_checkpoint(_state(2.0), path)
        finally:
            os._exit(1)  # not reached when SIGKILL arrives
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")  # the child's
    assert torch.load(path, weights_only=True)["global_step"] == 1
    plugin.save_checkpoint(_state(3.0), path)
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the killed save's temporary file removed
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_lightning_default_can_leave_a_partial_checkpoint(tmp_path, monkeypatch):
    """Why AtomicCheckpointIO exists: Lightning's TorchCheckpointIO stages the file in $TMPDIR
    and, when that is another file system, copies it into last.ckpt; a failure midway (disk
    full, the job killed) leaves a truncated last.ckpt. If this starts failing, Lightning writes
    atomically now and AtomicCheckpointIO can go."""
    from lightning.fabric.plugins import TorchCheckpointIO

    path = tmp_path / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(_state(1.0), path)

    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_half(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", cross_device)  # $TMPDIR on another file system
    monkeypatch.setattr(shutil, "copyfile", copy_half)
    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert not zipfile.is_zipfile(path)  # last.ckpt is neither the old nor the new checkpoint
    with pytest.raises((RuntimeError, OSError)):
        torch.load(path, weights_only=True)
    # the same failure cannot reach AtomicCheckpointIO: it renames within the checkpoint folder
    AtomicCheckpointIO().save_checkpoint(_state(1.0), path)
    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(shutil, "copyfile", copy_half)
    AtomicCheckpointIO().save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 2


def test_remote_paths_use_lightnings_implementation(monkeypatch):
    from lightning.fabric.plugins import TorchCheckpointIO

    calls = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", lambda *a, **k: calls.append(a[2]))
    AtomicCheckpointIO().save_checkpoint(_state(1.0), "memory://bucket/last.ckpt")
    assert calls == ["memory://bucket/last.ckpt"]
