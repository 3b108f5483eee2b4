"""Circuit selection, faithfulness, minimality and discovery against the independent ablation oracle."""

from __future__ import annotations

import json

import pytest
import torch

from circuitlib.circuits import (
    HEAD_SCORERS,
    discover_circuit,
    faithfulness,
    faithfulness_curve,
    k_grid,
    minimality,
    select_circuit,
    smallest_k,
    split_prompts,
)
from circuitlib.interventions import Ablation
from circuitlib.tasks import ioi_batch
from circuitlib.types import Circuit, HeadScores
from oracle import ablate, all_heads


@pytest.fixture(scope="module")
def batch(toy):
    return ioi_batch(toy.tokenizer, 12)


def oracle_ld(model, batch, keep, **kw):
    """Mean logit difference with every head outside ``keep`` ablated (oracle)."""
    outside = [h for h in all_heads(model) if h not in set(keep)]
    return float(ablate(model, batch, outside, **kw)[0].mean())


def test_select_by_top_k_and_threshold():
    scores = HeadScores(torch.tensor([[0.1, -0.9, 0.3], [0.5, 0.0, -0.2]]), method="act_patch", target="ioi", model="m")
    assert select_circuit(scores, top_k=2).heads == {(0, 1), (1, 0)}
    assert select_circuit(scores, top_k=2, absolute=False).heads == {(1, 0), (0, 2)}
    assert select_circuit(scores, threshold=0.25).heads == {(0, 1), (0, 2), (1, 0)}
    c = select_circuit(scores, threshold=0.25, absolute=False)
    assert c.heads == {(0, 2), (1, 0)} and c.task == "ioi" and "act_patch" in c.how
    with pytest.raises(ValueError, match="exactly one"):
        select_circuit(scores)
    with pytest.raises(ValueError, match="exactly one"):
        select_circuit(scores, top_k=1, threshold=0.1)


@pytest.mark.parametrize("kind,bos", [("mean", False), ("mean", True), ("zero", False)])
def test_faithfulness_matches_oracle(toy, batch, kind, bos):
    heads = all_heads(toy)
    circuit = Circuit.of(heads[::3], task="ioi", model="toy")
    res = faithfulness(toy, batch, circuit, ablation=Ablation(kind=kind, bos=bos))
    full = float(ablate(toy, batch, [])[0].mean())
    circ = oracle_ld(toy, batch, circuit.heads, kind=kind, bos=bos)
    empty = oracle_ld(toy, batch, set(), kind=kind, bos=bos)
    assert res.logit_diff_full == pytest.approx(full, abs=2e-3)
    assert res.logit_diff_circuit == pytest.approx(circ, abs=2e-3)
    assert res.logit_diff_empty == pytest.approx(empty, abs=2e-3)
    assert res.faithfulness == pytest.approx(circ / full, abs=2e-3)
    assert res.normalised == pytest.approx((circ - empty) / (full - empty), abs=2e-3)
    lo, hi = res.ci95
    assert lo < res.faithfulness < hi
    json.loads(res.to_json())


def test_bootstrap_interval_against_numpy(toy, batch):
    import numpy as np

    circuit = Circuit.of([(0, 0), (1, 6)], task="ioi", model="toy")
    res = faithfulness(toy, batch, circuit, n_boot=500, seed=3)
    full, _ = ablate(toy, batch, [])
    circ, _ = ablate(toy, batch, [h for h in all_heads(toy) if h not in circuit.heads])
    rng = np.random.default_rng(3)
    idx = rng.integers(0, len(batch), size=(500, len(batch)))
    r = circ.double().numpy()[idx].mean(1) / full.double().numpy()[idx].mean(1)
    assert res.ci95 == pytest.approx(tuple(np.percentile(r, [2.5, 97.5])), abs=2e-3)


def test_minimality_matches_oracle(toy, batch):
    circuit = Circuit.of(all_heads(toy)[1::4], task="ioi", model="toy")
    drops = minimality(toy, batch, circuit)
    full = float(ablate(toy, batch, [])[0].mean())
    with_all = oracle_ld(toy, batch, circuit.heads)
    for v in sorted(circuit.heads)[:3]:
        without = oracle_ld(toy, batch, circuit.heads - {v})
        assert drops[f"{v[0]}.{v[1]}"] == pytest.approx((with_all - without) / full, abs=2e-3)


def test_faithfulness_curve_matches_oracle_and_smallest_k_bisects(toy, batch):
    scores = HeadScores(torch.rand(toy.cfg.n_layers, toy.cfg.n_heads, generator=torch.Generator().manual_seed(0)),
                        method="random", target="ioi", model="toy")
    order = scores.top(24, absolute=True)
    full = float(ablate(toy, batch, [])[0].mean())
    curve = faithfulness_curve(toy, batch, scores, ks=[0, 3, 24])
    for k in (0, 3, 24):
        assert curve[k] == pytest.approx(oracle_ld(toy, batch, order[:k]) / full, abs=2e-3)
    # a coarse curve: bisection must find the same smallest k as the dense curve
    dense = faithfulness_curve(toy, batch, scores, ks=list(range(25)))
    target = 0.5 * (max(dense.values()) + min(dense.values()))
    want = min(k for k in range(1, 25) if dense[k] >= target)
    coarse = {k: dense[k] for k in (0, 24)}
    if all(dense[k] < target for k in range(1, want)) and all(dense[k] >= target for k in range(want, 25)):
        assert smallest_k(toy, batch, scores, coarse, target) == want


def test_k_grid():
    assert k_grid(24) == list(range(25))
    g = k_grid(384)
    assert g[:41] == list(range(41)) and g[-1] == 384 and len(g) < 60
    assert all(b / a <= 1.26 for a, b in zip(g[40:], g[41:]))


def test_bad_heads_and_method_raise_before_work(toy, batch, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        faithfulness(toy, batch, Circuit.of([(toy.cfg.n_layers, 0)], task="ioi", model="toy"))
    called = []
    monkeypatch.setitem(HEAD_SCORERS, "act_patch", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="unknown head-scoring method 'act_pach'"):
        discover_circuit(toy, "ioi", method="act_pach")
    assert not called


def test_split_prompts_are_disjoint_and_cover_templates_and_name_orders(toy):
    from circuitlib.tasks import ABBA_TEMPLATES, BABA_TEMPLATES

    sel, held = split_prompts("ioi", toy.tokenizer, 64)
    assert len(sel) == 64 and 60 <= len(held) <= 64
    assert not set(sel.prompts) & set(held.prompts)
    for half in (sel, held):  # both name orders in both halves (IOI batches alternate BABA / ABBA)
        assert set(half.template) & set(BABA_TEMPLATES) and set(half.template) & set(ABBA_TEMPLATES)
    # templates with two or more prompts appear in both halves
    both = [t for t in set(sel.template) | set(held.template) if (sel.template + held.template).count(t) >= 2]
    assert all(t in sel.template and t in held.template for t in both)


@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_discover_circuit_smallest_k_on_selection_and_heldout_conventions(toy, task):
    res = discover_circuit(toy, task, n_prompts=16, target=0.8, n_boot=100)
    k = res.meta["top_k"]
    assert len(res.circuit) == k
    sel, held = split_prompts(task, toy.tokenizer, 16)
    order = res.scores["act_patch"].top(24, absolute=True)
    assert set(order[:k]) == res.circuit.heads
    full = float(ablate(toy, sel, [])[0].mean())
    assert oracle_ld(toy, sel, order[:k]) / full == pytest.approx(res.selection.faithfulness, abs=2e-3)
    if res.reached_target:
        assert res.selection.faithfulness >= 0.8
        assert all(oracle_ld(toy, sel, order[:j]) / full < 0.8 for j in range(1, k))  # nothing smaller
    full_h = float(ablate(toy, held, [])[0].mean())
    assert res.heldout["mean"].faithfulness == pytest.approx(oracle_ld(toy, held, order[:k]) / full_h, abs=2e-3)
    assert res.heldout["zero"].faithfulness == pytest.approx(
        oracle_ld(toy, held, order[:k], kind="zero") / full_h, abs=2e-3)
    assert res.robust == [n for n, f in res.heldout.items() if f.faithfulness >= 0.8]
    assert set(res.timings) >= {"act_patch", "attribution", "path_patch", "faithfulness", "heldout"}
    json.loads(res.to_json())
