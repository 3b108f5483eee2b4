"""Fast under load (issue 14, ask 5): the batched paths with torch's threads pinned vs capped at the
free cores, while another process keeps one core busy.

Why: a batched path is a long sequence of parallel operations, each ending when its slowest thread
does; with more threads than free cores, a thread the scheduler parks stalls the rest (OpenMP
barriers). circuitlib's heavy calls therefore default to torch's thread count capped at the cores other
processes leave free (``circuitlib._cores``), sampled when the call starts.

Protocol (``benchmarks/protocol.py``): one busy-loop process (``python -c "while True: pass"``, started
here, killed at the end, also on errors) runs throughout; then, interleaved, ``--reps`` pairs of
(a) the call with ``threads=<pinned count>`` and (b) the same call with its default (``threads=None``);
results compared after every pair. Calls: ``act_patch_heads`` (gpt2-medium shape, random weights, 4 IOI
prompts) and MAPS ``static_scores_many`` (name copying + country -> capital, same random weights). Prints ``under load, <call>: capped vs pinned <x>x`` (> 1: the default is faster) and the CPU
time per wall second of each side (a pinned 2-thread run at ~1.1 spent its time waiting).

    .venv/bin/python benchmarks/bench_load.py [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol import footer, header, interleaved, mismatch  # noqa: E402

QUICK_SHAPE = dict(n_layers=6, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=50257, n_ctx=256)


def per_wall(cpu: list[float], wall: list[float]) -> float:
    """Median CPU seconds per wall second over the runs (about the threads kept busy)."""
    return median(c / w for c, w in zip(cpu, wall))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="pinned torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small model: checks the script runs")
    args = parser.parse_args()
    n = header(args.threads, title="bench_load: pinned vs free-core-capped threads under one busy process")
    if n < 2:
        print("only one torch thread: nothing to cap; run on a machine with >= 2 cores")
        return

    from circuitlib import _cores
    from circuitlib.models import random_model
    from circuitlib.patching import act_patch_heads
    from circuitlib.scoring import static_scores_many
    from circuitlib.tasks import ioi_batch

    model = random_model(QUICK_SHAPE if args.quick else "gpt2-medium")
    batch = ioi_batch(model.tokenizer, 2 if args.quick else 4)
    rels = ["name_copying", "country_to_capital_wikidata"]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        print(f"busy process started (pid {hog.pid}); free cores seen by circuitlib now: {_cores.free_cores()} "
              f"of {os.cpu_count()}", flush=True)
        cases = [
            ("act_patch_heads", lambda th: act_patch_heads(model, batch, threads=th).scores,
             lambda x, y: float((x - y).abs().max()) < 1e-5),
            ("MAPS static_scores_many", lambda th: {k: v.scores for k, v in static_scores_many(model, rels, threads=th).items()},
             lambda x, y: all(torch.equal(x[k], y[k]) for k in x)),
        ]
        lines = []
        for name, fn, same in cases:
            r = interleaved(lambda fn=fn: fn(n), lambda fn=fn: fn(None), reps=args.reps, check=same, label=name)
            lines.append(f"under load, {name}: capped vs pinned {r.median:.2f}x (min {r.lo:.2f}x, max {r.hi:.2f}x; "
                         f"median wall pinned {median(r.t_a):.1f} s, capped {median(r.t_b):.1f} s; "
                         f"CPU s per wall s: pinned {per_wall(r.cpu_a, r.t_a):.2f}, capped {per_wall(r.cpu_b, r.t_b):.2f})")
            print(lines[-1], flush=True)
    except KeyboardInterrupt:
        mismatch("interrupted")
    finally:
        hog.kill()
        hog.wait()
    footer()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
