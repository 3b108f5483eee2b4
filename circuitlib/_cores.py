"""How many torch threads a heavy call should use on a shared machine (issue 14, "fast under load").

Batched paths (MAPS's early-exit count, batched activation / path patching) are long sequences of
parallel operations, each ending when its slowest thread does. With more threads than free cores, a
thread the scheduler parks stalls all of them: on the project's 2-core machine with one other busy
process, ``act_patch_heads`` on gpt2-medium's shape took 85 s on 2 threads and 35 s on 1 (TransformerLens's
per-head loop: 670 s and 341 s). So these calls default to torch's thread count capped at the cores
other processes leave free, sampled when the call starts; an explicit ``threads=`` is used as given.
Results do not depend on the thread count beyond float rounding (tests compare them).
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def others_running() -> int | None:
    """Runnable threads of other processes right now (Linux: ``/proc/loadavg``'s running count minus
    this process's running threads), the median of 5 snapshots 2 ms apart; None where unavailable."""
    try:
        counts = []
        for i in range(5):
            if i:
                time.sleep(0.002)
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            own = 0
            for task in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{task}/stat") as f:
                        own += f.read().rsplit(")", 1)[1].split()[0] == "R"
                except OSError:  # the thread ended meanwhile
                    pass
            counts.append(max(0, running - own))
        return sorted(counts)[len(counts) // 2]
    except (OSError, ValueError, IndexError):
        return None


def free_cores() -> int:
    """Cores not busy with other processes (at least 1): from the instantaneous count of other
    processes' runnable threads (Linux), else from the 1-minute load average. (The load average alone
    would count this process's own recent work, e.g. a loop it ran just before, as other load.)"""
    cores = os.cpu_count() or 1
    others = others_running()
    if others is None:
        try:
            others = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on every platform
            return cores
    return max(1, int(cores - others + 0.5))


@contextmanager
def threads_for_free_cores(threads: int | None) -> Iterator[int]:
    """Run torch with ``threads`` intra-op threads (``None``: torch's count, capped at :func:`free_cores`);
    torch's setting is restored afterwards, also on exceptions."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive number of torch threads (or None: the free cores); got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        n = threads
    elif before == 1:
        n = 1  # one thread already: nothing to cap, so no free-core sampling
    else:
        n = min(before, free_cores())
    if n == before:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def on_free_cores(fn: F) -> F:
    """Decorator: ``fn`` runs under :func:`threads_for_free_cores` with its own ``threads`` keyword
    (``fn`` declares ``threads: int | None = None`` and otherwise ignores it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threads_for_free_cores(kwargs.get("threads")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
