"""The benchmark protocol (benchmarks/protocol.py, issue 14) on trivial functions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import protocol  # noqa: E402


def fake_clock(durations):
    """A clock that advances by the given durations, one per timed call (start/stop = 2 reads)."""
    state = {"t": 0.0, "i": 0, "started": False}

    def clock():
        if state["started"]:
            state["t"] += durations[state["i"]]
            state["i"] += 1
        state["started"] = not state["started"]
        return state["t"]

    return clock


def test_runs_are_interleaved_with_alternating_order():
    calls = []
    protocol.interleaved(lambda: calls.append("a"), lambda: calls.append("b"), reps=4, verbose=False)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_median_min_max_of_per_pair_ratios():
    # call order a b | b a | a b: durations by call -> a = 6, 4, 10; b = 2, 4, 1 -> ratios 3, 1, 10
    clock = fake_clock([6, 2, 4, 4, 10, 1])
    r = protocol.interleaved(lambda: None, lambda: None, reps=3, clock=clock, verbose=False)
    assert r.t_a == [6, 4, 10] and r.t_b == [2, 4, 1]
    assert r.ratios == [3.0, 1.0, 10.0]
    assert (r.median, r.lo, r.hi) == (3.0, 1.0, 10.0)  # the mean would be 4.67
    assert r.line().startswith("speedup: 3.0x (min 1.0x, max 10.0x; 3 interleaved pairs")


def test_scale_a_extrapolates_the_baseline():
    clock = fake_clock([1, 2, 1, 1, 1, 1])  # a = 1, 1, 1; b = 2, 1, 1
    r = protocol.interleaved(lambda: None, lambda: None, reps=3, clock=clock, scale_a=8, label="x", verbose=False)
    assert r.ratios == [4.0, 8.0, 8.0]
    assert r.line().startswith("speedup x: 8.0x") and "x8 (extrapolated)" in r.line()


def test_sleep_ratio_is_about_two():
    r = protocol.interleaved(lambda: time.sleep(0.02), lambda: time.sleep(0.01), reps=3, verbose=False)
    assert 1.5 < r.median < 2.5, r.ratios


def test_fewer_than_three_reps_is_refused():
    with pytest.raises(ValueError, match="at least 3"):
        protocol.interleaved(lambda: 1, lambda: 1, reps=2)


def test_check_sees_both_results_every_pair():
    seen = []
    protocol.interleaved(lambda: "A", lambda: "B", reps=3, check=lambda x, y: seen.append((x, y)) or True,
                         verbose=False)
    assert seen == [("A", "B")] * 3


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("check", ["lambda x, y: x == y", "lambda x, y: None", "lambda x, y: 1 / 0"])
def test_mismatch_exits_non_zero(check):
    p = _run(f"import protocol\nprotocol.interleaved(lambda: 1, lambda: 2, check={check}, label='t')\n"
             "print('NOT REACHED')")
    assert p.returncode != 0
    assert "MISMATCH: t" in p.stdout and "NOT REACHED" not in p.stdout


def test_equal_results_exit_zero_and_header_footer_print_the_protocol():
    p = _run("import protocol\nprotocol.header(threads=1)\n"
             "r = protocol.interleaved(lambda: 1, lambda: 1, check=lambda x, y: x == y, label='t')\n"
             "print(r.line())\nprotocol.footer()\nimport torch; print('threads now', torch.get_num_threads())")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for needle in ("date: ", "machine: ", "logical cores", "torch threads: 1 intra-op (pinned)",
                   "load average before:", "load average after:", "own 1 busy threads", "speedup t: ", "threads now 1"):
        assert needle in out, (needle, out)


def test_load_warning_above_half_the_cores():
    assert protocol.load_warning(1.1, cores=2) is not None
    assert protocol.load_warning(1.0, cores=2) is None
    assert "half of 8 cores" in protocol.load_warning(4.5, cores=8)
