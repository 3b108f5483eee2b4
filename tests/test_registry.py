"""Adding a task is one builder plus one registry entry: the report handles any number of tasks."""

import json

import torch

import pytest

from circuitlib import report
from circuitlib.tasks import TASK_SPECS, TaskSpec, copying_batch, register_task, report_tasks, task_batch


def short_copying(tokenizer, n=64, *, seed=0, model_name="", **_):
    """A tiny extra task: name lists of exactly two names said twice."""
    return copying_batch(tokenizer, n, seed=seed, lengths=(2, 2), model_name=model_name)


@pytest.fixture
def extra_task():
    spec = register_task(TaskSpec("short_copy", "Short copying", short_copying, relation="name_copying"))
    try:
        yield spec
    finally:
        TASK_SPECS.pop(spec.name)


def test_registered_task_is_built_and_listed(toy, extra_task):
    assert "short_copy" in report_tasks()
    b = task_batch("short_copy", toy.tokenizer, 4)
    assert len(b) == 4 and all(p.count(" ") == 4 for p in b.prompts)  # "A B , A" + leading space
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("short_copy", "x", short_copying))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_batch("nope", toy.tokenizer)


def test_report_runs_with_a_registered_extra_task(toy, extra_task, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "N_PROMPTS", 16)
    monkeypatch.setattr(report, "DISCOVERY_PROMPTS", 16)
    s = report.run_report("toy", tmp_path, model=toy, progress=False, n_random=20)
    tasks = ["ioi", "colored_objects", "capitals", "short_copy"]  # registry order, the new task last
    assert list(s["baseline"]["tasks"]) == tasks
    assert list(s["discovery"]) == tasks
    assert list(s["overlap"]["pairs"]) == [f"{a}|{b}" for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    assert len(s["overlap"]["reuse"]) == 4 and all(len(v) == 4 for v in s["overlap"]["reuse"].values())
    md = (tmp_path / "report.md").read_text()
    assert "Short copying" in md
    json.loads((tmp_path / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# Scorers that take a candidate subset, and discovery's big-model limits (forced on the toy's 24 heads)


def test_coarse_k_grid_by_hand():
    from circuitlib.circuits import coarse_k_grid

    # 4 x 1.5 = 6, 9, 13.5 -> 14, 21, 31.5 -> 32, 48, 72, 108 -> the cap 96 (a quarter of 384)
    assert coarse_k_grid(384) == [0, 1, 2, 3, 4, 6, 9, 14, 21, 32, 48, 72, 96]
    assert coarse_k_grid(24, cap=5) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("atp_screen", [False, True])
def test_a_scorer_taking_candidates_gets_the_screened_heads(toy, monkeypatch, atp_screen):
    """The screen ranks heads by exact activation patching (default) or by attribution patching
    (atp_screen=True); a scorer taking ``candidates`` runs on the top ``screen`` of that ranking."""
    from circuitlib import circuits
    from circuitlib.patching import act_patch_heads, attribution_patch_heads
    from circuitlib.types import HeadScores

    seen = {}

    def subset_scorer(model, batch, *, direction, progress=False, candidates=None):
        seen["candidates"] = candidates
        seen["batch"] = batch
        full = act_patch_heads(model, batch, direction=direction)
        keep = torch.zeros_like(full.scores, dtype=torch.bool)
        for l, h in candidates:
            keep[l, h] = True
        return HeadScores(torch.where(keep, full.scores, 0.0), method="subset", target=batch.task,
                          model=full.model, meta=full.meta)

    monkeypatch.setitem(circuits.HEAD_SCORERS, "subset", subset_scorer)
    res = circuits.discover_circuit(toy, "capitals", n_prompts=8, method="subset", scorers=["subset", "attribution"],
                                    screen=5, max_k=None, n_boot=10, atp_screen=atp_screen)
    # the ranking, recomputed independently
    ranking = (attribution_patch_heads if atp_screen else act_patch_heads)(toy, seen["batch"])
    want = sorted(ranking.top(5, absolute=True))
    assert seen["candidates"] == want
    assert res.meta["screen"]["candidates"] == [f"{l}.{h}" for l, h in want]
    assert res.meta["screen"]["by"].startswith("|attribution|" if atp_screen else "|act_patch|")
    assert "subset" in res.meta["screen"]["exact_on_candidates"]
    assert res.meta["k_grid"]["max_k"] == 5  # the curve stops at the screened heads
    assert max(res.curve) <= 5 and set(res.circuit.heads) <= set(want)
    with pytest.raises(ValueError, match="screen must be between 1 and 24"):
        circuits.discover_circuit(toy, "capitals", n_prompts=4, screen=25)


def test_capped_curve_stops_at_the_target_and_bisects(toy):
    from circuitlib import circuits
    from circuitlib.circuits import faithfulness_curve, split_prompts

    target = 0.8
    res = circuits.discover_circuit(toy, "capitals", n_prompts=16, target=target, scorers=["act_patch"], screen=None,
                                    max_k=12, n_boot=10)
    sel, _ = split_prompts("capitals", toy.tokenizer, 16)
    dense = faithfulness_curve(toy, sel, res.scores["act_patch"], ks=list(range(25)))  # every k, one run
    for k, v in res.curve.items():
        assert v == pytest.approx(dense[k], abs=2e-4)
    grid = circuits.coarse_k_grid(24, cap=12)  # [0, 1, 2, 3, 4, 6, 9, 12]
    first_hit = next(k for k in grid if k > 0 and dense[k] >= target)
    stop = grid[(grid.index(first_hit) // 4 + 1) * 4 - 1] if (grid.index(first_hit) // 4 + 1) * 4 <= len(grid) else grid[-1]
    assert max(k for k in res.curve if k in grid) == stop  # runs of 4 points, none after the one with the hit
    want = next(k for k in range(1, 25) if dense[k] >= target)
    assert res.meta["top_k"] == want and res.reached_target


def test_screened_activation_patching_is_exact_where_verified(toy):
    from circuitlib import circuits
    from circuitlib.circuits import split_prompts
    from circuitlib.patching import act_patch_heads

    res = circuits.discover_circuit(toy, "capitals", n_prompts=8, scorers=["act_patch"], screen=6, max_k=None,
                                    n_boot=10, atp_screen=True)
    hs = res.scores["act_patch"]
    info = hs.meta["screened"]
    assert 1 <= len(info["verified"]) <= 6 and info["max_verified"] == 6
    sel, _ = split_prompts("capitals", toy.tokenizer, 8)
    exact = act_patch_heads(toy, sel)  # every head, the unscreened method
    for name in info["verified"]:
        l, h = map(int, name.split("."))
        assert float(hs.scores[l, h]) == pytest.approx(float(exact.scores[l, h]), abs=1e-5)
    assert "act_patch" in res.meta["screen"]["exact_on_candidates"]


def test_default_screen_patches_every_head_exactly_and_path_patches_its_top_heads(toy):
    from circuitlib import circuits
    from circuitlib.circuits import split_prompts
    from circuitlib.patching import act_patch_heads

    res = circuits.discover_circuit(toy, "ioi", n_prompts=8, scorers=["act_patch", "path_patch"], screen=4,
                                    max_k=None, n_boot=10)
    sel, _ = split_prompts("ioi", toy.tokenizer, 8)
    exact = act_patch_heads(toy, sel)  # every head, computed here
    assert torch.allclose(res.scores["act_patch"].scores, exact.scores, atol=1e-5)
    top = sorted(exact.top(4, absolute=True))
    assert res.meta["screen"]["candidates"] == [f"{l}.{h}" for l, h in top]
    pp = res.scores["path_patch"].scores
    off = [(l, h) for l in range(toy.cfg.n_layers) for h in range(toy.cfg.n_heads) if (l, h) not in top]
    assert all(float(pp[l, h]) == 0.0 for l, h in off)  # path patching ran on the top 4 only
