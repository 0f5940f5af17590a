"""DDP inside Hydra runs and sweeps: the other ranks re-run exactly the current job.

Lightning's DDP starts ranks 1..N-1 by re-running `sys.argv`. In a Hydra multirun that argv is
the whole sweep, so every rank would start a sweep of its own (and with a search sweeper train
other hyperparameters). `HydraDDPStrategy` starts each rank with only the current job's overrides,
in RUN mode, into the job's own output directory. `job_scope()` then puts the process back as it
was after each job (environment variables, process group), so the next job of a sweep launches
its ranks afresh. Under SLURM or torchrun (ranks started outside) nothing is launched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

_ENTRY_ENV = "LMDISTILL_ENTRY_MODULE"
_launched: list[subprocess.Popen] = []  # the ranks this process started in the current job

# Hydra settings of the sweep itself; a rank runs one job, so none of them may reach it.
_SWEEP_ONLY = ("hydra.mode", "hydra/launcher", "hydra/sweeper", "hydra.launcher", "hydra.sweeper",
               "hydra.sweep", "hydra.run", "hydra.output_subdir", "hydra.job.name")  # fmt: skip


def rank_command(local_rank: int, entry_module: str) -> tuple[list[str], str]:
    """The command line (and working directory) that runs the current Hydra job as `local_rank`.

    Built from Hydra's record of the job, not from `sys.argv`: under a launcher (Ray, submitit)
    the process is the launcher's worker, whose argv is not ours.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", entry_module, "--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:  # --config-dir of the original command
        if source.provider == "command-line" and source.schema == "file":
            command += ["--config-dir", source.path]
    command += [o for o in hydra_cfg.overrides.hydra if not o.lstrip("+~").startswith(_SWEEP_ONLY)]
    command += list(hydra_cfg.overrides.task)
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        "hydra.output_subdir=null",  # rank 0 wrote the job's .hydra/ already
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",  # log file <job>_rank<r>.log
    ]
    return command, hydra_cfg.runtime.cwd


class _JobLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, with `rank_command` as the command of each rank."""

    def __init__(self, *args, entry_module: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.entry_module = entry_module

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # not a Hydra app: Lightning's own command is right
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ.update(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK=str(env.local_rank()),
            WORLD_SIZE=str(self.num_processes * self.num_nodes),
        )
        for local_rank in range(1, self.num_processes):
            command, cwd = rank_command(local_rank, self.entry_module)
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))
        _launched.extend(self.procs)


class HydraDDPStrategy(DDPStrategy):
    """`DDPStrategy` whose ranks re-run only the current Hydra job (see the module docstring).

    entry_module: the `python -m` module of the Hydra app that ranks 1..N-1 run; by default the
    one whose `job_scope` is running (lmdistill-distill or lmdistill-finetune).
    """

    def __init__(self, *args, entry_module: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.entry_module = entry_module

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _JobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes,
                entry_module=self.entry_module or os.environ.get(_ENTRY_ENV, "lmdistill.distill"),
            )  # fmt: skip


def gather_from_ranks(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] outside distributed training."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def is_first_rank() -> bool:
    """Whether this process is global rank 0 (known from the environment before any Trainer)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextmanager
def job_scope(entry_module: str) -> Iterator[None]:
    """Run one job of the Hydra app `entry_module`; afterwards the ranks it started have exited,
    the process group is gone and the environment is as before.

    Lightning's launcher leaves `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_*` and `NODE_RANK` in the
    environment; the next job of a sweep would take them as "ranks started outside" and wait
    forever for ranks that never come. Within a job they stay: a job of several trainings (a
    teacher assistant's two stages) runs them all in one process group.
    """
    saved = dict(os.environ)
    os.environ[_ENTRY_ENV] = entry_module  # what the job's other ranks run (see HydraDDPStrategy)
    try:
        yield
        _wait_for_launched_ranks()
    finally:
        for proc in _launched:  # after a failure they may wait in a collective forever
            if proc.poll() is None:
                proc.kill()
        _launched.clear()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def _wait_for_launched_ranks(timeout_s: float = 600) -> None:
    for local_rank, proc in enumerate(_launched, start=1):
        code = proc.wait(timeout=timeout_s)
        if code != 0:
            raise RuntimeError(f"rank {local_rank} (pid {proc.pid}) exited with code {code}")
