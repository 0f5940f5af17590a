"""Settings that depend on the machine: the default precision, TF32, compilation.

`trainer.precision=auto` (the default) trains in bf16-mixed where the device has bf16 units (CUDA
GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX) and in float32 elsewhere: on a CPU without
them bf16 is emulated and slower than float32 (0.67x measured on an Intel Xeon without
`avx512_bf16`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from lmdistill.errors import UserError

log = logging.getLogger("lmdistill")

PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX-512 BF16 or AMX), from its flags."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def trains_on_cuda(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` (auto, cpu, gpu, cuda) trains on a CUDA GPU here."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def on_mps() -> bool:
    """Whether an Apple GPU is there (Lightning's `accelerator=auto` picks it over the CPU)."""
    return torch.backends.mps.is_available()


def check_precision(setting, key: str = "trainer.precision") -> str:
    """`setting` as a string, if it is one of `PRECISIONS`; else a `UserError` naming `key`."""
    setting = str(setting)
    if setting not in PRECISIONS:
        raise UserError(f"unknown {key} '{setting}'; use one of {', '.join(PRECISIONS)}")
    return setting


def resolve_precision(setting, accelerator: str = "auto", key: str = "trainer.precision") -> str:
    """`key`'s precision as Lightning takes it; `auto` chooses for the device that trains."""
    setting = check_precision(setting, key)
    if setting != "auto":
        return setting
    if trains_on_cuda(accelerator):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        bf16 = cpu_has_bf16()
    return "bf16-mixed" if bf16 else "32"


def enable_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA GPUs (Ampere and newer); no effect on
    CPUs. Also applies to the float32 relation math under mixed precision."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def compile_backend(setting) -> str | None:
    """The `torch.compile` backend of the `compile` setting: false -> None, true -> inductor, or
    a backend name (e.g. aot_eager: fast to compile, for checks)."""
    if setting in (False, None, "false"):
        return None
    if setting in (True, "true"):
        return "inductor"
    backends = torch._dynamo.list_backends(exclude_tags=())
    if setting not in backends:
        raise UserError(
            f"unknown compile={setting}; use false, true (inductor) or a torch.compile backend: "
            f"{', '.join(backends)}"
        )
    return str(setting)


def compile_layers(layers: nn.ModuleList, backend: str = "inductor") -> None:
    """`torch.compile` the forward of each layer in place: parameter names, state dicts, exports
    and forward hooks (the Q/K/V capture) are unchanged. Shapes that vary between batches
    (dynamic padding) are compiled once as dynamic."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend)
