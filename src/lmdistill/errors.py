"""Errors the user can fix, and how entry points report them.

A `UserError` is raised wherever bad input is detected (impossible shapes, missing files, an
incompatible teacher and student, a corrupt checkpoint). Entry points turn it into one line on
stderr that names the problem and the fix, and a non-zero exit; `HYDRA_FULL_ERROR=1` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input with a known fix; the message is one line: the problem, then the fix."""


def report_user_errors(func: F) -> F:
    """Decorator for entry points: print a `UserError` as one line and exit non-zero."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            user_error = _as_user_error(err)
            if user_error is None or full_error_requested():
                raise
            exit_with(user_error)

    return wrapper  # type: ignore[return-value]


def full_error_requested() -> bool:
    """`HYDRA_FULL_ERROR=1`: show tracebacks instead of one-line errors."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_with(user_error: UserError) -> NoReturn:
    """Print `user_error` as one line on stderr and exit with `EXIT_USER_ERROR`."""
    print(f"lmdistill: error: {_rank_prefix()}{user_error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _rank_prefix() -> str:
    """ "rank N: " in DDP ranks other than the first, whose errors may differ from its error."""
    from lmdistill.distributed import is_first_rank

    if is_first_rank():
        return ""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return f"rank {rank_zero_only.rank}: "


def _as_user_error(err: BaseException) -> UserError | None:
    """The `UserError` behind `err` (config resolvers and Hydra wrap it), or a missing value."""
    from omegaconf.errors import MissingMandatoryValue

    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        if isinstance(seen, MissingMandatoryValue):
            key = getattr(seen, "full_key", None) or "a required field"
            return UserError(f"no value given for {key}; set it on the command line: {key}=...")
        seen = seen.__cause__ or seen.__context__
    return None
