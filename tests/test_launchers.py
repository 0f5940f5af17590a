"""Sweep launcher presets: `hydra/launcher=ray_gpus` (one GPU per job) and `hydra/launcher=slurm`.

Each sweep runs once (module-scoped fixtures), on the tiny models with logical GPUs on the CPU.
The SLURM preset is checked by composition; its submitit code path by a sweep through
submitit's local executor. The test-only callback job_recorder.RecordJob writes job.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from cli_helpers import TINY, check_ok, cli_env, compose_distill, run_cli, write_corpus
from hydra import initialize_config_dir
from test_distill_errors import _assert_one_error_line

from lmdistill.errors import UserError

TESTS = str(Path(__file__).parent)


class Sweep(NamedTuple):
    driver: int  # the pid of `python -m lmdistill.distill -m ...`, also its session id
    jobs: list[dict]  # per job directory: its job.json, with its summary.json as "summary"
    survivors: list[int]  # processes of the driver's session left alive after it exited


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes in session `sid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z" and int(session) == sid:
            found.append(int(stat.parent.name))
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_sweep(args: list[str], out: Path, workdir: Path, cache_dir: Path, **env: str) -> Sweep:
    """A two-job sweep in its own session; afterwards, whatever is left of it is killed."""
    args = [
        "-m",
        *TINY,
        f"data.paths=[{workdir / 'corpus.txt'}]",
        "method=minilm_v1,minilm_v2",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "+callbacks.recorder._target_=job_recorder.RecordJob",
        f"hydra.sweep.dir={out}",
        *args,
    ]
    pythonpath = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    env = cli_env(cache_dir, PYTHONPATH=pythonpath, RAY_ADDRESS=None, **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdistill.distill", *args],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        deadline = time.monotonic() + 20  # Ray stops its processes at the driver's exit
        while (survivors := session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        kill_all(survivors)
    check_ok((proc.returncode, stdout, stderr))
    jobs = []
    for job in sorted(p for p in out.iterdir() if (p / ".hydra").is_dir()):
        record = json.loads((job / "job.json").read_text())
        record["summary"] = json.loads((job / "summary.json").read_text())
        jobs.append(record)
    return Sweep(proc.pid, jobs, survivors)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_teacher_dir) -> Path:
    """A small corpus; the tiny teacher is built before the jobs start, not by both at once."""
    path = tmp_path_factory.mktemp("launchers")
    write_corpus(path / "corpus.txt", documents=10)
    return path


@pytest.fixture(scope="module")
def ray_sweep(workdir, cache_dir) -> Iterator[Sweep]:
    """Two logical GPUs and two CPUs: both jobs at once, each with its own GPU."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        yield run_sweep(
            [
                "hydra/launcher=ray_gpus",
                "hydra.launcher.ray.init.address=local",  # never an existing Ray cluster
                "+hydra.launcher.ray.init.num_gpus=2",
                "+hydra.launcher.ray.init.num_cpus=2",
            ],
            workdir / "ray",
            workdir,
            cache_dir,
            RAY_TMPDIR=ray_tmp,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def submitit_sweep(workdir, cache_dir) -> Sweep:
    return run_sweep(["hydra/launcher=submitit_local"], workdir / "submitit", workdir, cache_dir)


def check_jobs(sweep: Sweep) -> None:
    """Two finished jobs, one per method, each in a process of its own, not the driver's."""
    assert sorted(job["summary"]["method"] for job in sweep.jobs) == ["minilm_v1", "minilm_v2"]
    assert all(job["summary"]["steps"] == 2 for job in sweep.jobs)
    pids = {job["pid"] for job in sweep.jobs}
    assert len(pids) == 2 and sweep.driver not in pids


# --- Ray: one logical GPU per job --------------------------------------------------------------


def test_ray_runs_each_job_in_its_own_process(ray_sweep):
    check_jobs(ray_sweep)
    assert all(job["ppid"] != ray_sweep.driver for job in ray_sweep.jobs)  # Ray workers


def test_ray_gives_each_job_its_own_gpu(ray_sweep):
    gpus = sorted(job["CUDA_VISIBLE_DEVICES"] for job in ray_sweep.jobs)
    assert gpus == ["0", "1"]


def test_ray_leaves_nothing_running(ray_sweep):
    # the workers ran in the driver's session, so the survivors' scan covers them
    assert all(job["sid"] == ray_sweep.driver for job in ray_sweep.jobs)
    assert ray_sweep.survivors == []


def test_ray_preset_takes_one_gpu_per_device():
    cfg = compose_distill(["hydra/launcher=ray_gpus", "trainer.devices=2"])
    ray = cfg.hydra.launcher.ray
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")
    assert ray.remote.num_gpus == 2 and ray.remote.max_calls == 1 and ray.remote.max_retries == 0
    assert ray.init.address is None and ray.init.include_dashboard is False


def multirun_config(overrides: list[str]):
    """The config a `-m` sweep's callbacks get (sweep overrides unexpanded)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("distill", overrides, run_mode=RunMode.MULTIRUN)


RAY_REFUSED = {
    "devices": (["trainer.devices=1,2"], "(num_gpus = the base trainer.devices, 1)"),
    "group": (["trainer=default,ddp"], "(num_gpus = the base trainer.devices, 1)"),
    "ddp_base": (["trainer=ddp", "trainer.devices=range(1,5)"], "(num_gpus = the base trainer.devices, 2)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RAY_REFUSED))
def test_ray_refuses_a_swept_device_count(case):
    from lmdistill.sweep_checks import check_sweep

    overrides, base = RAY_REFUSED[case]
    cfg = multirun_config(["hydra/launcher=ray_gpus", *overrides])
    with pytest.raises(UserError) as info:
        check_sweep(cfg)
    message = str(info.value)
    assert base in message and f"swept {overrides[-1]};" in message, message
    assert message.endswith("hydra.launcher.ray.remote.num_gpus=<N>"), message


@pytest.mark.parametrize(
    "overrides",
    [["hydra/launcher=ray_gpus", "trainer.devices=2", "method=minilm_v1,minilm_v2"],
     ["hydra/launcher=ray_gpus", "trainer.devices=1,2", "hydra.launcher.ray.remote.num_gpus=2"],
     ["trainer.devices=1,2"], ["hydra/launcher=slurm", "trainer=default,ddp"]],
)  # fmt: skip
def test_ray_sweeps_it_can_run_pass(overrides):
    from lmdistill.sweep_checks import check_sweep

    check_sweep(multirun_config(overrides))


def test_ray_refusal_is_one_line_before_any_job(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=ray_gpus", "trainer.devices=1,2", f"hydra.sweep.dir={out}"]
    code, _, stderr = run_cli(args, tmp_path, cache_dir, timeout=120)
    _assert_one_error_line(code, stderr, "ray_gpus", "trainer.devices=1,2", "num_gpus=<N>")
    assert not out.exists()  # not even multirun.yaml: the sweeper never started


# --- SLURM through submitit ----------------------------------------------------------------------


def test_slurm_preset_runs_one_task_per_device():
    from hydra.utils import instantiate

    cfg = compose_distill(["hydra/launcher=slurm", "trainer.devices=4"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params  # resolved, as submitit gets them
    assert params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["nodes"] == 1 and params["partition"] is None
    assert 0 < params["signal_delay_s"] < params["timeout_min"] * 60
    assert params["max_num_timeout"] > 0


def test_slurm_preset_follows_trainer_num_nodes():
    cfg = compose_distill(["hydra/launcher=slurm", "trainer.num_nodes=2"])
    assert cfg.hydra.launcher.nodes == 2


def test_submitit_runs_each_job_in_its_own_process(submitit_sweep):
    check_jobs(submitit_sweep)
    assert all(job["sid"] == submitit_sweep.driver for job in submitit_sweep.jobs)
    assert submitit_sweep.survivors == []
