"""Build lmdistill's real objects (module, data, trainer) in-process for benchmarks.

`compose(overrides, out_dir)` composes `conf/distill.yaml` exactly as `lmdistill-distill` does
and resolves it; `lmdistill.distill.build(cfg)` then gives the module, DataModule and Trainer the
CLI would train with.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "disabled")


def compose(overrides: list[str], out_dir: str | Path):
    """The resolved distillation config of `overrides`, writing into `out_dir`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("distill", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def quiet_overrides() -> list[str]:
    """No progress bar and no checkpoints during the timed steps (the CSV logger stays: it writes
    once per logging interval)."""
    return [
        "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.every_n_train_steps=1000000",
    ]
