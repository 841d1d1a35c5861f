"""Workers: processes that never outlive the run that started them, threads that map a
stream in order, and how many cores this process may use."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How often a worker without prctl looks whether its parent is still there.
_PARENT_POLL_S = 1.0


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as set by taskset, cgroups'
    cpusets or a batch scheduler), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def die_with_parent(parent: int) -> None:
    """Initializer of a worker process started by process `parent`: the worker is killed
    when its parent dies, even by SIGKILL, rather than living on re-parented to init (on
    Linux through PR_SET_PDEATHSIG; elsewhere a thread watches the parent)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def in_threads(function: Callable[[In], Out], items: Iterable[In], threads: int, name: str
               ) -> Iterator[Out]:
    """function(item) of each item, in the items' order, computed in `threads` threads named
    `name`, at most two per thread ahead of the one given out (memory stays flat however
    many items). `items` is read in the calling thread."""
    ahead: deque[Future] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        for item in items:
            ahead.append(pool.submit(function, item))
            if len(ahead) > 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
