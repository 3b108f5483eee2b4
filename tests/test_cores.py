"""circuitlib._cores: heavy calls cap torch's threads at the free cores, and restore them.

The free-core count is checked against a process this test starts (a busy loop); patching results are
checked against the same call pinned to one thread and to torch's count (thread count must not change
them beyond float rounding)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from circuitlib import _cores
from circuitlib.patching import act_patch_heads, path_patch
from circuitlib.tasks import ioi_batch


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="Linux /proc needed for the runnable-thread count")
def test_a_busy_process_takes_a_core_away():
    cores = os.cpu_count() or 1
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert _cores.others_running() >= 1
        assert _cores.free_cores() <= max(1, cores - 1)
    finally:
        hog.kill()
        hog.wait()


def test_patching_results_do_not_depend_on_threads_and_threads_are_restored(toy):
    batch = ioi_batch(toy.tokenizer, 8)
    before = torch.get_num_threads()
    ref = act_patch_heads(toy, batch, threads=1).scores
    for threads in (2, None):
        got = act_patch_heads(toy, batch, threads=threads).scores
        assert torch.get_num_threads() == before
        assert (got - ref).abs().max() < 1e-5
    pp1 = path_patch(toy, batch, threads=1).scores
    pp2 = path_patch(toy, batch, threads=2).scores
    assert torch.get_num_threads() == before
    assert (pp1 - pp2).abs().max() < 1e-5


def test_threads_restored_on_errors_and_bad_threads_rejected(toy):
    batch = ioi_batch(toy.tokenizer, 4)
    same = replace(batch, corrupt=batch.clean.clone())
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with pytest.raises(ValueError, match="identical"):
        act_patch_heads(toy, same, threads=other)
    assert torch.get_num_threads() == before
    for bad in (0, -1):
        with pytest.raises(ValueError, match="threads must be a positive number"):
            act_patch_heads(toy, batch, threads=bad)
