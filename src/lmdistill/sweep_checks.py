"""Sweeps a launcher would run other than as written, refused before any job starts.

hydra/launcher=ray_gpus reserves `hydra.launcher.ray.remote.num_gpus: ${trainer.devices}` GPUs
per job, but hydra-ray-launcher resolves it once, in the sweep's base config: a swept
`trainer.devices` (or `trainer` group) is not seen, and every job gets the base count. `CheckSweep`
(a Hydra callback, conf/hydra/*.yaml) refuses such a sweep in one line naming the fix.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmdistill.errors import UserError, exit_with

_DEVICES = ("trainer.devices", "trainer")  # the key, and the group whose options set it


class CheckSweep(Callback):
    """Runs `check_sweep` on the multirun config, before the sweeper launches anything."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config)
        except UserError as err:  # Hydra would turn it into a warning and go on
            exit_with(err)


def check_sweep(config: DictConfig) -> None:
    """A `UserError` if the launcher's per-job GPU count cannot follow a swept trainer.devices."""
    remote = OmegaConf.select(config, "hydra.launcher.ray.remote")
    if remote is None or not OmegaConf.is_interpolation(remote, "num_gpus"):
        return  # not ray_gpus, or num_gpus given: every job reserves that many
    if "trainer.devices" not in OmegaConf.to_container(remote, resolve=False)["num_gpus"]:
        return
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    for override in overrides:
        if override.is_sweep_override() and override.key_or_group in _DEVICES:
            raise UserError(
                f"hydra/launcher=ray_gpus reserves the same GPUs for every job (num_gpus = the "
                f"base trainer.devices, {remote.num_gpus}), so it would not follow the swept "
                f"{override.input_line}; sweep one devices value per command, or reserve the most "
                "any job needs for all: hydra.launcher.ray.remote.num_gpus=<N>"
            )
