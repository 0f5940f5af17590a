"""Run lmdistill's entry points in a subprocess, offline, and write a small English corpus."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

# the tiny teacher and student; each CLI run with them takes a few seconds (imports dominate)
# (validation off: tests of it turn it on, tests/methods/test_validation.py)
TINY = ["teacher=tiny", "student=tiny", "data=text", "data.batch_size=8", "data.num_workers=0",
        "trainer.log_every_n_steps=1", "trainer.precision=32", "data.val_batches=0"]  # fmt: skip

_SENTENCES = [
    "The river bends slowly around the old mill before it reaches the town.",
    "Scientists measured the temperature of the lake every morning for a whole year.",
    "Most of the villagers worked in the fields during the long summer months.",
    "A new bridge was built across the valley in the early twentieth century.",
    "The library keeps thousands of books about history, art and mathematics.",
    "Children walked to school along a narrow road lined with tall oak trees.",
    "The committee published its report after three years of careful study.",
    "Heavy rain flooded the lower streets, and the market was closed for a week.",
    "Her first novel describes a family that moves from the coast to the city.",
    "The museum displays tools, coins and pottery found near the ancient harbour.",
    "Engineers replaced the wooden roof of the station with one made of steel.",
    "In winter the mountain pass is often closed because of snow and ice.",
    "The orchestra performed the symphony twice before the composer was satisfied.",
    "Farmers in the region grow wheat, barley and several kinds of vegetables.",
    "A small team of volunteers repairs the footpaths every spring.",
    "The castle was abandoned in the seventeenth century and slowly fell into ruin.",
]


def write_corpus(path: Path, documents: int = 40, seed: int = 0) -> Path:
    """A few KB of prose: documents of 2-4 paragraphs, separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        paragraphs = [
            " ".join(rng.choice(_SENTENCES) for _ in range(rng.randint(3, 6)))
            for _ in range(rng.randint(2, 4))
        ]
        docs.append("\n".join(paragraphs))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def pythonpath(*dirs: str | Path) -> str:
    """PYTHONPATH for a subprocess: `dirs`, then this process's PYTHONPATH (the source tree
    under test, where it is set ahead of the installed one)."""
    return os.pathsep.join(filter(None, [*map(str, dirs), os.environ.get("PYTHONPATH")]))


def cli_env(cache_dir: Path, **overrides: str | None) -> dict:
    """The test environment: offline hub and datasets, offline W&B, the session cache."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        LMDISTILL_CACHE=str(cache_dir),
    )
    env.pop("HYDRA_FULL_ERROR", None)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(
    args: list[str],
    cwd: Path,
    cache_dir: Path,
    module: str = "lmdistill.distill",
    timeout: float = 240,
    env: dict | None = None,
    python: list[str] | None = None,
) -> tuple[int, str, str]:
    """`python -m <module> <args>` in `cwd` (stdin closed: nothing may prompt)."""
    proc = subprocess.run(
        [*(python or [sys.executable]), "-m", module, *args],
        cwd=cwd,
        env=env if env is not None else cli_env(cache_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def check_ok(result: tuple[int, str, str]) -> tuple[int, str, str]:
    code, out, err = result
    assert code == 0, f"exit {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
    return result


def read_metrics(path: Path) -> list[dict]:
    """Rows of a CSVLogger metrics.csv, empty cells dropped, numbers as floats."""
    import csv

    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def step_losses(path: Path) -> dict[int, float]:
    """{global step: train/loss} from a metrics.csv."""
    return {int(r["step"]): r["train/loss"] for r in read_metrics(path) if "train/loss" in r}


def step_figures(path: Path, prefixes: tuple[str, ...] = ("train/loss", "moe/")) -> dict:
    """{global step: {name: value}} of the figures named with `prefixes`, from a metrics.csv
    logged every step (the learning rate and throughput left out)."""
    return {int(r["step"]): {k: v for k, v in r.items() if k.startswith(prefixes)}
            for r in read_metrics(path) if "train/loss" in r}  # fmt: skip


def compose_distill(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("distill", overrides=overrides, return_hydra_config=True)


def resolved_config(cfg, output_dir: Path) -> dict:
    """Everything resolved, `${hydra:...}` from the composed hydra config."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
