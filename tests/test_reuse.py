"""Cross-task ablation and the reuse analysis (circuitlib.reuse)."""

import json

import numpy as np
import pytest
import torch

from circuitlib import overlap, reuse
from circuitlib.types import Circuit, HeadScores

def _draws(heads, model, n, seed):
    """The random sets cross_task_ablation draws: same size, from outside the circuit, seeded."""
    outside = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in heads]
    assert len(outside) >= len(heads)
    rng = np.random.default_rng(seed)
    return [[outside[i] for i in sorted(rng.choice(len(outside), size=len(heads), replace=False))] for _ in range(n)]


def test_cross_task_ablation_on_toy(toy):
    from circuitlib.ablation import run_ablated
    from circuitlib.metrics import accuracy, logit_diff
    from circuitlib.tasks import ioi_batch

    batch = ioi_batch(toy.tokenizer, 16, seed=0)
    heads = [(2, h) for h in range(toy.cfg.n_heads)]  # the whole last layer
    res = reuse.cross_task_ablation(toy, Circuit.of(heads, "x", "toy"), batch, n_random=3)
    # the batched multi-set ablation agrees with ablating this one set alone (hook context manager)
    alone = run_ablated(toy, batch, heads, at="all")
    assert res["ablated"]["accuracy"] == pytest.approx(accuracy(alone, batch))
    assert res["ablated"]["logit_diff"] == pytest.approx(float(logit_diff(alone, batch)), abs=1e-4)
    for draw, heads_drawn in zip(res["random"]["draws"], _draws(heads, toy, 3, 0)):
        ref = run_ablated(toy, batch, heads_drawn, at="all")
        assert draw["heads"] == [f"{l}.{h}" for l, h in heads_drawn]
        assert draw["logit_diff"] == pytest.approx(float(logit_diff(ref, batch)), abs=1e-4)
    assert res["random"]["n_draws"] == 3 and len(res["random"]["draws"]) == 3
    assert 1 / 4 <= res["empirical_p"] <= 1
    norms = np.array([d["normalised"] for d in res["random"]["draws"]])
    assert res["z_score"] == pytest.approx((res["ablated"]["normalised"] - norms.mean()) / norms.std())
    assert res["clean"]["normalised"] == 1.0
    json.dumps(res)
    empty = reuse.cross_task_ablation(toy, [], batch, n_random=1)
    assert empty["ablated"]["normalised"] == pytest.approx(1.0)
    big = reuse.cross_task_ablation(toy, [(l, h) for l in range(3) for h in range(7)], batch, n_random=1)
    assert big["random"]["random_pool"].startswith("all heads")
    with pytest.raises(ValueError, match="does not exist"):
        reuse.cross_task_ablation(toy, [(5, 0)], batch)


def test_reuse_analysis_is_json_and_consistent(toy):
    from circuitlib.tasks import task_batch

    g = torch.Generator().manual_seed(0)
    rel = {t: HeadScores(torch.rand(3, 8, generator=g), "maps_static", t, "toy") for t in ("ioi", "capitals")}
    patch = {t: HeadScores(torch.randn(3, 8, generator=g), "act_patch", t, "toy") for t in ("ioi", "capitals")}
    circuits = {t: Circuit.of(patch[t].top(10, absolute=True), t, "toy") for t in patch}
    batches = {t: task_batch(t, toy.tokenizer, 8, seed=0) for t in patch}
    res = reuse.reuse_analysis(toy, rel, patch, circuits, batches, n_random=2, n_permutations=200)
    json.loads(json.dumps(res))
    assert res["core_size"] == 6 == reuse.default_core_size(24, 10)
    assert set(res["cores"]["ioi"]) == {f"{l}.{h}" for l, h in patch["ioi"].top(6, absolute=True)}
    assert res["pairs"]["ioi|capitals"]["circuits"] == overlap.set_overlap(circuits["ioi"], circuits["capitals"], 24)
    assert set(res["reuse"]) == {"ioi", "capitals"} and set(res["reuse"]["ioi"]) == {"ioi", "capitals"}
    assert all(0 <= t["p"] <= 1 for t in res["p_values"])
