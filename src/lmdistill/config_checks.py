"""Obviously bad values in a composed config, reported before anything is built or written.

Hydra accepts any value its grammar parses (`seed=abc`, `optim.lr=-1`, a dict written as the
string `qq:1`); without these checks they surface later as tracebacks from PyTorch, Lightning or
a `**` unpacking. `check_config(cfg)` raises a `UserError` (one line: the value, then the fix) for
the first bad value among the fields the config has, so the entry points of lmdistill-distill
and lmdistill-finetune share it: each config has only some of the fields below. The `eval` group
of lmdistill-distill (GLUE after distillation) is checked here too, before distillation starts,
and so are trainer.accelerator, .devices and .precision against this machine (a GPU setting where
PyTorch sees no GPU, 16-mixed on a CPU).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path

from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lmdistill.errors import UserError
from lmdistill.glue.tasks import TASKS, get_task
from lmdistill.glue.tsv import task_file
from lmdistill.hardware import check_precision, on_mps, trains_on_cuda

_ABSENT = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _positive_number(value) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a positive number"


def _positive_int(value) -> str | None:
    return None if _is_int(value) and value > 0 else "must be a positive integer"


def _int(value) -> str | None:
    return None if _is_int(value) else "must be an integer"


def _fraction(value) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else "must be a number from 0 to 1"


def _non_negative_number(value) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a number >= 0"


def _optional_positive_int(value) -> str | None:
    return None if value is None else _positive_int(value)


def _relation_weights(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return "is not a mapping (an unquoted dict is read as a string)"
    if not all(_is_number(v) and v >= 0 for v in value.values()):
        return "must map qq, kk, vv to numbers >= 0"
    return None


def _items(value) -> list:
    """A list's items; a single value (`eval.tasks=rte`) is a list of one."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _each(check: Callable[[object], str | None]) -> Callable[[object], str | None]:
    """`check` on every item of a non-empty list (or on a single value)."""

    def check_all(value) -> str | None:
        items = _items(value)
        if not items:
            return "is empty"
        return next((check(v) for v in items if check(v) is not None), None)

    return check_all


def _glue_task(value) -> str | None:
    name = str(value).lower().replace("-", "")
    return None if name in TASKS else f"names no GLUE task ('{value}')"


def _select(value) -> str | None:
    return None if value in ("best", "last") else "must be best or last"


# (key, check, the fix): keys a config does not have are skipped
_CHECKS: list[tuple[str, Callable[[object], str | None], str]] = [
    ("seed", _int, "e.g. seed=1"),
    ("optim.lr", _positive_number, "e.g. optim.lr=3e-4"),
    ("optim.weight_decay", _non_negative_number, "e.g. optim.weight_decay=0.01"),
    ("optim.warmup_ratio", _fraction, "e.g. optim.warmup_ratio=0.01"),
    ("trainer.accumulate_grad_batches", _positive_int, "e.g. trainer.accumulate_grad_batches=1"),
    ("data.batch_size", _positive_int, "e.g. data.batch_size=32"),
    (
        "method.relation_weights",
        _relation_weights,
        "write it as a dict in braces, quoted for the shell, e.g. 'method.relation_weights={qq: 1, kk: 1, vv: 1}', "
        "or set one weight: method.relation_weights.qq=1",
    ),
    # lmdistill-finetune
    ("lr", _positive_number, "e.g. lr=2e-5"),
    ("batch_size", _positive_int, "e.g. batch_size=32"),
    ("epochs", _positive_int, "e.g. epochs=3"),
    ("weight_decay", _non_negative_number, "e.g. weight_decay=0.01"),
    ("warmup_ratio", _fraction, "e.g. warmup_ratio=0.1"),
    ("data.train_limit", _optional_positive_int, "e.g. data.train_limit=5000, or null for all"),
    ("data.max_seq_length", _positive_int, "e.g. data.max_seq_length=128"),
    ("select", _select, "e.g. select=best"),
    # lmdistill-distill eval=glue
    (
        "eval.tasks",
        _each(_glue_task),
        f"use some of {', '.join(TASKS)}, e.g. eval.tasks=[rte,mrpc]",
    ),
    ("eval.lrs", _each(_positive_number), "e.g. eval.lrs=[1e-4,5e-5]"),
    ("eval.epochs", _each(_positive_int), "e.g. eval.epochs=[3]"),
    ("eval.seeds", _each(_int), "e.g. eval.seeds=[42]"),
    ("eval.batch_size", _positive_int, "e.g. eval.batch_size=32"),
    ("eval.eval_batch_size", _positive_int, "e.g. eval.eval_batch_size=128"),
    ("eval.max_seq_length", _positive_int, "e.g. eval.max_seq_length=128"),
    ("eval.train_limit", _optional_positive_int, "e.g. eval.train_limit=5000, or null for all"),
    ("eval.weight_decay", _non_negative_number, "e.g. eval.weight_decay=0.01"),
    ("eval.warmup_ratio", _fraction, "e.g. eval.warmup_ratio=0.1"),
    ("eval.select", _select, "e.g. eval.select=best"),
]


def check_config(cfg: DictConfig) -> None:
    """Raise a `UserError` naming the first obviously bad value of `cfg` and how to fix it."""
    for key, check, fix in _CHECKS:
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except MissingMandatoryValue:
            continue  # a ???: the entry point's own error names it
        if value is _ABSENT:
            continue  # not a field of this config
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        problem = check(value)
        if problem is not None:
            raise UserError(f"{key}={_show(value)} {problem}; {fix}")
    _check_distill_steps(cfg)
    _check_eval(cfg)
    _check_devices(cfg)


def _check_distill_steps(cfg: DictConfig) -> None:
    """A distillation counts optimizer steps (the corpus streams; its schedule needs the count)."""
    if OmegaConf.select(cfg, "export") is None:
        return  # not lmdistill-distill (lmdistill-finetune counts epochs)
    value = OmegaConf.select(cfg, "trainer.max_steps")
    problem = _positive_int(value)
    if problem is not None:
        raise UserError(
            f"trainer.max_steps={_show(value)} {problem}: a distillation trains that many "
            "optimizer steps; e.g. trainer.max_steps=1000"
        )


def _check_devices(cfg: DictConfig) -> None:
    """trainer.accelerator, .devices and .precision (and eval.precision) that this machine cannot
    honour: Lightning would stop with several lines after the models are loaded, or (16-mixed on
    a CPU) train in bf16-mixed instead."""
    trainer = OmegaConf.select(cfg, "trainer")
    if trainer is None:
        return  # lmdistill-sparsify: `device`
    accelerator = trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str):
        return  # an Accelerator instantiated from its own config: Lightning checks it
    names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    if accelerator not in names:
        raise UserError(
            f"unknown trainer.accelerator '{accelerator}'; use one of {', '.join(names)}"
        )
    on_cuda = trains_on_cuda(accelerator)
    if accelerator in ("gpu", "cuda") and not on_cuda:
        raise UserError(
            f"trainer.accelerator={accelerator}, but PyTorch finds no CUDA GPU on this machine; "
            "use trainer.accelerator=auto (or cpu), or run where a GPU is visible"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not on_cuda and not on_mps())
    devices = trainer.get("devices", "auto")
    if isinstance(devices, ListConfig):
        devices = OmegaConf.to_object(devices)
    problem = _devices_problem(devices, on_cpu)
    if problem is not None:
        raise UserError(f"trainer.devices={_show(devices)} {problem}")
    for key in ("trainer.precision", "eval.precision"):
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if check_precision(value, key) == "16-mixed" and on_cpu:
            raise UserError(
                f"{key}=16-mixed needs a CUDA GPU: on the CPU Lightning trains in bf16-mixed "
                f"instead; use {key}=bf16-mixed (or 32, or auto) here"
            )


def _devices_problem(devices, on_cpu: bool) -> str | None:
    """What is wrong with Lightning's `devices`: auto, a count, or GPUs (-1 = all, indices)."""
    if isinstance(devices, str) and re.fullmatch(r"\s*-?\d+\s*", devices):
        devices = int(devices)
    if devices == "auto" or (_is_int(devices) and devices > 0):
        return None
    gpus = (
        devices == -1
        or (isinstance(devices, list) and devices and all(_is_int(d) and d >= 0 for d in devices))
        or (isinstance(devices, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)+,?", devices))
    )
    if not gpus:
        return (
            "must be a positive number of devices per node, GPU indices, or auto; "
            "e.g. trainer.devices=1"
        )
    if on_cpu:
        return (
            "selects GPUs, but this run trains on the CPU; give a number of processes, "
            "e.g. trainer.devices=2"
        )
    return None


def _check_eval(cfg: DictConfig) -> None:
    """GLUE after distillation (`eval=glue`) fine-tunes the export: it needs one that a classifier
    loads (not a once-for-all super-net), and its data."""
    if OmegaConf.select(cfg, "eval") is None or OmegaConf.select(cfg, "export") is None:
        return  # not lmdistill-distill, or no eval
    if not cfg.export:
        raise UserError(
            "eval=glue fine-tunes the exported student, but export=false; set export=true "
            "or drop eval=glue"
        )
    if str(OmegaConf.select(cfg, "method._target_", default="")).endswith(".OFAMiniLM"):
        raise UserError(
            "eval=glue fine-tunes the exported student, but method=ofa_minilm exports a "
            "super-net, which no classifier loads; drop eval=glue and fine-tune its sub-networks "
            "(ofa.export) with lmdistill-finetune"
        )
    glue_dir = cfg.eval.get("glue_dir")
    if glue_dir is not None and not Path(str(glue_dir)).expanduser().is_dir():
        raise UserError(
            f"eval.glue_dir {glue_dir} does not exist; point it at a folder of GLUE TSV files "
            "(CoLA/, RTE/, ...) or set eval.glue_dir=null to use the hub"
        )
    if glue_dir is not None:  # every task's files, before a distillation that may take days
        for name in _items(OmegaConf.to_container(cfg.eval.tasks, resolve=True)):
            task = get_task(str(name))
            for stem in ("train", *(s for _, s, _ in task.dev_splits)):
                task_file(str(glue_dir), task, stem)


def _show(value) -> str:
    """The value as the user typed it (strings unquoted, like a Hydra override)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ",".join(map(_show, value)) + "]"
    return str(value)
