"""DataLoader workers die with the process that started them.

PyTorch's workers notice a dead parent only between batches (a watchdog polls every 5 s while
the worker waits for work); a worker busy reading or tokenizing when its parent is SIGKILLed
(OOM killer, `scancel`, a node health check) lives on as an orphan holding its memory.
`die_with_parent(worker_init_fn)` wraps a loader's `worker_init_fn` so that each worker, as it
starts, asks Linux to send it SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`); a parent
already dead by then is caught by comparing the parent pid. Elsewhere than Linux it only runs the
wrapped function (PyTorch's own watchdog remains).

The death signal is tied to the parent *thread* that created the worker: the loader's iterator
must be created by a thread that lives as long as the loader (Lightning's training loop does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _DieWithParent:
    """A picklable `worker_init_fn`: the death signal, then the wrapped function."""

    def __init__(self, inner: Callable[[int], None] | None, parent_pid: int):
        self.inner = inner
        self.parent_pid = parent_pid

    def __call__(self, worker_id: int) -> None:
        set_parent_death_signal()
        if os.getppid() != self.parent_pid:  # the parent died before the signal was set
            os._exit(1)
        if self.inner is not None:
            self.inner(worker_id)


def die_with_parent(worker_init_fn: Callable[[int], None] | None) -> Callable[[int], None]:
    """`worker_init_fn` (None: none) wrapped as described above; wrapping twice is a no-op."""
    if isinstance(worker_init_fn, _DieWithParent):
        return worker_init_fn
    return _DieWithParent(worker_init_fn, os.getpid())


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Have this process receive `signum` when its parent dies; whether that is supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
