"""trainer.accelerator, .devices and .precision this machine cannot honour: one line naming the
fix from the config checks, before any model is loaded (Lightning would stop later, in several
lines, or train 16-mixed as bf16-mixed on a CPU). The CPU cases patch CUDA away, the GPU cases
patch it in, so both run on any machine."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import TINY, compose_distill

from lmdistill.config_checks import check_config
from lmdistill.errors import UserError

GPU_ONLY = "selects GPUs, but this run trains on the CPU; give a number of processes, e.g. trainer.devices=2"  # fmt: skip
NOT_DEVICES = "must be a positive number of devices per node, GPU indices, or auto; e.g. trainer.devices=1"  # fmt: skip

ON_CPU = {
    "trainer.devices=0": f"trainer.devices=0 {NOT_DEVICES}",
    "trainer.devices=-2": f"trainer.devices=-2 {NOT_DEVICES}",
    "trainer.devices=abc": f"trainer.devices=abc {NOT_DEVICES}",
    "trainer.devices=-1": f"trainer.devices=-1 {GPU_ONLY}",
    "trainer.devices=[0,1]": f"trainer.devices=[0,1] {GPU_ONLY}",
    "trainer.accelerator=gpu": (
        "trainer.accelerator=gpu, but PyTorch finds no CUDA GPU on this machine; "
        "use trainer.accelerator=auto (or cpu), or run where a GPU is visible"
    ),
    "trainer.accelerator=cuda": (
        "trainer.accelerator=cuda, but PyTorch finds no CUDA GPU on this machine; "
        "use trainer.accelerator=auto (or cpu), or run where a GPU is visible"
    ),
    "trainer.accelerator=bogus": (
        "unknown trainer.accelerator 'bogus'; use one of auto, gpu, cpu, cuda, mps, tpu"
    ),
    "trainer.precision=16-mixed": (
        "trainer.precision=16-mixed needs a CUDA GPU: on the CPU Lightning trains in bf16-mixed "
        "instead; use trainer.precision=bf16-mixed (or 32, or auto) here"
    ),
    "eval.precision=fp8": (
        "unknown eval.precision 'fp8'; use one of auto, 32, 32-true, bf16-mixed, 16-mixed, "
        "bf16-true, 16-true, 64"
    ),
}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("override", sorted(ON_CPU))
def test_run_refuses_before_building(override, no_cuda, tmp_path, cache_dir):
    from lmdistill.distill import run

    out = tmp_path / "out"
    extra = ["eval=glue"] if override.startswith("eval.") else []
    cfg = compose_distill([*TINY, "data=sample", *extra, override, f"paths.output_dir={out}"])
    with pytest.raises(UserError) as info:
        run(cfg)
    assert str(info.value) == ON_CPU[override]
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides",
    [["trainer.devices=[0,1]"], ["trainer.devices=-1"], ["trainer.devices='0,1'"],
     ["trainer.accelerator=gpu", "trainer.precision=16-mixed"],
     ["eval=glue", "eval.precision=16-mixed"]],
)  # fmt: skip
def test_gpu_settings_pass_where_cuda_is(overrides, monkeypatch, cache_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_config(compose_distill(overrides))


def test_cpu_processes_pass_without_cuda(no_cuda, cache_dir):
    check_config(compose_distill(["trainer=ddp", "trainer.devices=3", "trainer.accelerator=cpu"]))
    check_config(compose_distill(["trainer.devices='2'", "trainer.precision=bf16-mixed"]))


def test_finetune_is_checked_too(no_cuda):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=["model=x", "trainer.devices=0"])
    with pytest.raises(UserError, match=r"^trainer\.devices=0 must be a positive number"):
        check_config(cfg)
