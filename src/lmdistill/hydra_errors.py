"""Hydra's composition and override errors as one line: the problem and the fix.

Hydra reports a misspelt config group option, an unknown key or an unparsable override in
several lines (option lists, search paths, a hint about `HYDRA_FULL_ERROR`) from inside
`hydra._internal.utils.run_and_report`, which wraps every compose, run and multirun of a
`@hydra.main` app. `report_hydra_errors` wraps what it runs, so those errors become one
`lmdistill: error: ...` line and exit code 2 (`lmdistill.errors`); everything else, and all of
it under `HYDRA_FULL_ERROR=1`, still reaches Hydra's own reporting.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hydra._internal import utils as hydra_utils
from hydra.errors import (
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf.errors import OmegaConfBaseException

from lmdistill.errors import UserError, exit_with, full_error_requested

F = TypeVar("F", bound=Callable)


def report_hydra_errors(main: F) -> F:
    """Decorator for a `@hydra.main` entry point: its config errors print as one line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with _one_line_config_errors():
            return main(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _one_line_config_errors() -> Iterator[None]:
    hydra_run_and_report = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        return hydra_run_and_report(lambda: _exit_on_config_error(func))

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = hydra_run_and_report


def _exit_on_config_error(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except HydraException as err:
        # instantiate() errors come from the job's code: they keep their traceback
        if isinstance(err, InstantiationException) or full_error_requested():
            raise
        exit_with(UserError(describe(err)))


def describe(err: HydraException) -> str:
    """One line for a Hydra config error: what is wrong and what to write instead."""
    if isinstance(err, MissingConfigException) and err.options:
        return _missing_option(err.missing_cfg_file, err.options)
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override '{err.override}': {_one_line(err.message)}"
    cause = err.__cause__
    if getattr(cause, "parent_node", None) is not None and "not in struct" in str(cause):
        return _missing_key(err, cause)
    text = _one_line(str(err))
    if isinstance(cause, OmegaConfBaseException):
        text += f" ({_one_line(str(cause))})"
    return text


def _missing_option(missing: str, options: list[str]) -> str:
    """`student/L3-H385` among the options of the group `student`."""
    from lmdistill.resources import CONF_DIR

    group, _, name = missing.rpartition("/")
    where = f"conf/{group}" if (CONF_DIR / group).is_dir() else f"the config group {group}"
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    return f"no {group} '{name}' in {where}; {hint}choose one of: {', '.join(options)}"


# top-level blocks that only a method's config brings (no other method reads them)
METHOD_BLOCKS = {"ofa": "method=ofa_minilm"}


def _missing_key(err: HydraException, cause: OmegaConfBaseException) -> str:
    """An override of a key the config does not have: the closest key, and how to add one (or,
    for a block of one method, that method)."""
    full_key = cause.full_key
    parent = full_key.rpartition(".")[0]
    keys = [str(k) for k in cause.parent_node.keys()]
    overridden = re.search(r"Could not override '([^']+)'", str(err))
    added = overridden.group(1) if overridden else full_key
    if not parent and str(cause.key) in METHOD_BLOCKS and "method" in keys:
        method = METHOD_BLOCKS[str(cause.key)]
        return f"no key {added}: {cause.key}.* settings belong to {method}; add {method}"
    close = difflib.get_close_matches(str(cause.key), keys, n=1)
    if close:
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    else:
        hint = f"{parent or 'the config'} has: {', '.join(keys)}"
    return f"no key {full_key}; {hint} (to add a new key use +{added}=...)"


def _one_line(text: str) -> str:
    """Hydra's message lines joined by '; ', without the config search path it appends."""
    text = text.split("Config search path:")[0]
    lines = [line.strip().rstrip(".") for line in text.splitlines() if line.strip()]
    return "; ".join(lines)
