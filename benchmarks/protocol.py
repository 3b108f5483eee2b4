"""A benchmark protocol that holds on a shared machine (issue 14, ask 1).

Every speed ratio the README quotes comes from a run that follows it:

- **Interleaved A/B repetitions in one process**: baseline ``a`` and candidate ``b`` run alternately
  (a b, b a, a b, ...: the order flips every pair so a slow drift of the machine's load favours
  neither), ``reps >= 3`` times each, on the same inputs.
- **Per-pair ratios**: ratio_i = wall(a_i) / wall(b_i) of the two adjacent runs of pair i (> 1: ``b``
  is faster); the reported figure is the **median** of the per-pair ratios, with their min and max.
  Adjacent runs share the machine's state, so a load spike that hits one pair does not skew the rest.
- **Threads pinned and printed**: :func:`header` calls ``torch.set_num_threads`` (default: the
  current count, which torch sets to the physical cores) and prints it, with torch's version.
- **Load**: ``os.getloadavg()`` printed before (:func:`header`) and after (:func:`footer`), with a
  warning when the 1-minute load exceeds half the cores (``os.cpu_count()``).
- **Results equal**: ``check(result_a, result_b)`` runs after every pair; unless it returns a true value
  (False, None, or an exception), the process prints ``MISMATCH`` and exits with status 1 — a benchmark never reports a
  speed-up for a result that differs.
- **Date and machine**: :func:`header` prints the local date and time, the CPU model, the number of
  logical cores, the platform and the Python / torch versions.

API::

    from protocol import header, interleaved, footer     # benchmarks/ is on sys.path for its scripts
    header(threads=None)                                  # pins + prints threads, date, machine, load
    r = interleaved(baseline, fast, reps=3, check=lambda x, y: torch.equal(x, y), label="random")
    print(r.line())      # 'speedup random: 12.3x (min 11.8x, max 12.9x; 3 interleaved pairs; ...)'
    footer()                                              # load after, warning

``a`` and ``b`` are zero-argument callables; their return values are what ``check`` compares. Times
are wall-clock (``time.perf_counter``); the process CPU time of each run is recorded too
(``Ratio.cpu_a`` / ``cpu_b``): CPU time well above wall time x threads, or wall time well above CPU
time / threads, shows the machine's other load or thread oversubscription.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Ratio", "header", "footer", "interleaved", "mismatch", "cpu_model", "load_warning"]


@dataclass
class Ratio:
    """Times of interleaved A/B runs and their per-pair ratios ``wall(a_i) / wall(b_i)``.

    ``median``, ``lo``, ``hi``: median, min and max of the per-pair ratios. ``scale_a``: factor the
    baseline's times were multiplied by (e.g. a baseline run on 48 of 384 heads: 8.0), 1.0 if none.
    """

    label: str
    t_a: list[float] = field(default_factory=list)
    t_b: list[float] = field(default_factory=list)
    cpu_a: list[float] = field(default_factory=list)
    cpu_b: list[float] = field(default_factory=list)
    scale_a: float = 1.0

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.t_a, self.t_b)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def lo(self) -> float:
        return min(self.ratios)

    @property
    def hi(self) -> float:
        return max(self.ratios)

    def line(self, name: str = "speedup") -> str:
        """``'<name> <label>: <median>x (min ..x, max ..x; n interleaved pairs; a .. s, b .. s)'``."""
        tag = f"{name} {self.label}" if self.label else name
        scaled = f", baseline times x{self.scale_a:g} (extrapolated)" if self.scale_a != 1.0 else ""
        return (f"{tag}: {self.median:.1f}x (min {self.lo:.1f}x, max {self.hi:.1f}x; {len(self.t_a)} interleaved "
                f"pairs; median wall a {statistics.median(self.t_a):.3f} s, b {statistics.median(self.t_b):.3f} s"
                f"{scaled})")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_warning(load1: float, cores: int | None = None) -> str | None:
    """A warning when the 1-minute load average exceeds half the cores, else None."""
    cores = cores or os.cpu_count() or 1
    if load1 > cores / 2:
        return (f"WARNING: load average {load1:.2f} > half of {cores} cores: other processes compete for the CPU; "
                "ratios may be distorted, rerun on a quiet machine")
    return None


def _print_load(when: str, own: int = 0) -> tuple[float, float, float]:
    """Print the load average; ``own``: threads this run itself kept busy just before (the 1-minute
    average after a run counts them too, so the warning looks at the load minus ``own``)."""
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    mine = f"; includes this run's own {own} busy threads, other load ~{max(0.0, load[0] - own):.2f}" if own else ""
    print(f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min; {cores} cores{mine})")
    warn = load_warning(max(0.0, load[0] - own), cores)
    if warn:
        print(warn)
    return load


def header(threads: int | None = None, title: str | None = None) -> int:
    """Pin torch's intra-op threads (``threads``, default: torch's current count) and print the date,
    the machine, the versions, the threads and the load average. Returns the thread count."""
    import torch

    n = int(threads) if threads is not None else torch.get_num_threads()
    torch.set_num_threads(n)
    if title:
        print(title)
    now = _dt.datetime.now().astimezone()
    print(f"date: {now.isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}; "
          f"python {platform.python_version()}, torch {torch.__version__}")
    env = ", ".join(f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ)
    print(f"torch threads: {torch.get_num_threads()} intra-op (pinned), {torch.get_num_interop_threads()} inter-op"
          + (f"; {env}" if env else ""))
    _print_load("before")
    sys.stdout.flush()
    return n


def footer() -> tuple[float, float, float]:
    """Print the load average after the runs, noting that it counts the run's own (pinned) threads, with
    the warning when the load *minus those threads* exceeds half the cores. (A contended run shows in
    the per-run lines too: CPU time well below wall time x threads.)"""
    import torch

    load = _print_load("after", own=torch.get_num_threads())
    sys.stdout.flush()
    return load


def mismatch(message: str) -> None:
    """Print ``MISMATCH: message`` and exit the process with status 1."""
    print(f"MISMATCH: {message}", flush=True)
    raise SystemExit(1)


def _timed(fn: Callable[[], Any], clock: Callable[[], float]) -> tuple[Any, float, float]:
    c0, t0 = time.process_time(), clock()
    out = fn()
    t1, c1 = clock(), time.process_time()
    return out, t1 - t0, c1 - c0


def interleaved(
    a: Callable[[], Any],
    b: Callable[[], Any],
    reps: int = 3,
    check: Callable[[Any, Any], bool] | None = None,
    *,
    label: str = "",
    scale_a: float = 1.0,
    verbose: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Ratio:
    """Run baseline ``a`` and candidate ``b`` alternately, ``reps`` times each (pair i runs a then b
    for even i, b then a for odd i); return their :class:`Ratio` (per pair ``wall(a)/wall(b)``).

    ``check(result_a, result_b)``: called after every pair; anything but a true value (False,
    None, an exception) -> :func:`mismatch` (exit status 1). ``scale_a``: multiply ``a``'s times (a baseline run on a subset, extrapolated;
    printed in :meth:`Ratio.line`). ``clock``: the timer (tests inject a fake one).
    """
    if reps < 3:
        raise ValueError(f"reps={reps}: the protocol needs at least 3 interleaved repetitions of each side")
    r = Ratio(label=label, scale_a=float(scale_a))
    for i in range(reps):
        if i % 2 == 0:
            out_a, ta, ca = _timed(a, clock)
            out_b, tb, cb = _timed(b, clock)
        else:
            out_b, tb, cb = _timed(b, clock)
            out_a, ta, ca = _timed(a, clock)
        if check is not None:
            try:
                res = check(out_a, out_b)
                ok = res is not None and bool(res)
            except Exception as e:  # noqa: BLE001  (any failure of the check is a mismatch)
                mismatch(f"{label or 'results'}: check raised {type(e).__name__}: {e}")
            if not ok:
                mismatch(f"{label or 'results'}: the two sides' results differ (pair {i + 1} of {reps})")
        r.t_a.append(ta * scale_a)
        r.t_b.append(tb)
        r.cpu_a.append(ca * scale_a)
        r.cpu_b.append(cb)
        if verbose:
            order = "a,b" if i % 2 == 0 else "b,a"
            print(f"  {label or 'pair'} {i + 1}/{reps} ({order}): a {ta * scale_a:.3f} s (cpu {ca * scale_a:.3f}), "
                  f"b {tb:.3f} s (cpu {cb:.3f}), ratio {ta * scale_a / tb:.2f}", flush=True)
    return r
