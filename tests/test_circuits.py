"""Circuit selection, faithfulness and minimality against naive per-circuit ablation runs."""

from __future__ import annotations

import json

import pytest
import torch

from circuitlib.ablation import run_ablated
from circuitlib.circuits import (
    ablate_copies,
    discover_circuit,
    faithfulness,
    faithfulness_curve,
    minimality,
    select_circuit,
)
from circuitlib.metrics import logit_diff
from circuitlib.models import TOY_DIR
from circuitlib.tasks import ioi_batch
from circuitlib.types import Circuit, HeadScores






@pytest.fixture(scope="module")
def batch(toy):
    return ioi_batch(toy.tokenizer, 12)


def all_heads(model):
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def naive_logit_diff(model, batch, circuit_heads):
    """Mean-ablate the complement with circuitlib.ablation (one forward per circuit)."""
    outside = [h for h in all_heads(model) if h not in circuit_heads]
    return float(logit_diff(run_ablated(model, batch, outside, kind="mean", at="all"), batch))


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


def test_circuit_of_all_heads_is_fully_faithful(toy, batch):
    full = Circuit.of(all_heads(toy), task="ioi", model="toy")
    result = faithfulness(toy, batch, full)
    assert result["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert result["normalised"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        assert result["logit_diff_full"] == pytest.approx(float(logit_diff(toy(batch.clean), batch)), abs=1e-3)
    assert "mean" in result["ablation"] and "corrupted" in result["reference"]
    json.dumps(result)


def test_faithfulness_matches_naive_ablation(toy, batch):
    heads = all_heads(toy)
    circuit = Circuit.of(heads[::3], task="ioi", model="toy")
    result = faithfulness(toy, batch, circuit)
    assert result["logit_diff_circuit"] == pytest.approx(naive_logit_diff(toy, batch, circuit.heads), abs=1e-3)
    assert result["logit_diff_empty"] == pytest.approx(naive_logit_diff(toy, batch, set()), abs=1e-3)
    assert result["faithfulness"] == pytest.approx(result["logit_diff_circuit"] / result["logit_diff_full"], abs=1e-3)


def test_minimality_matches_naive_ablation(toy, batch):
    heads = all_heads(toy)
    circuit = Circuit.of(heads[1::4], task="ioi", model="toy")
    drops = minimality(toy, batch, circuit)
    assert set(drops) == set(circuit.names())
    full, with_all = naive_logit_diff(toy, batch, set(heads)), naive_logit_diff(toy, batch, circuit.heads)
    for v in list(circuit)[:3]:
        without = naive_logit_diff(toy, batch, circuit.heads - {v})
        assert drops[f"{v[0]}.{v[1]}"] == pytest.approx((with_all - without) / full, abs=1e-3)


def test_faithfulness_curve_ends_and_matches_single_circuits(toy, batch):
    scores = HeadScores(torch.rand(toy.cfg.n_layers, toy.cfg.n_heads, generator=torch.Generator().manual_seed(0)),
                        method="random", target="ioi", model="toy")
    curve = faithfulness_curve(toy, batch, scores, ks=[0, 3, toy.cfg.n_layers * toy.cfg.n_heads])
    assert curve[toy.cfg.n_layers * toy.cfg.n_heads] == pytest.approx(1.0, abs=1e-4)
    assert curve[3] == pytest.approx(faithfulness(toy, batch, select_circuit(scores, top_k=3))["faithfulness"], abs=1e-3)


def test_ablation_hooks_removed_on_exception(toy, batch):
    with torch.no_grad():
        before = toy(batch.clean)
    mask = torch.ones(1, toy.cfg.n_layers, toy.cfg.n_heads, dtype=torch.bool)
    means = torch.zeros(toy.cfg.n_layers, toy.cfg.n_heads, toy.cfg.d_head)
    with pytest.raises(RuntimeError, match="inside"):
        with ablate_copies(toy, mask, means):
            assert any(hp.fwd_hooks for hp in toy.hook_dict.values())
            raise RuntimeError("inside")
    assert all(not hp.fwd_hooks for hp in toy.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(toy(batch.clean), before)


def test_bad_heads_and_reference_raise(toy, batch):
    with pytest.raises(ValueError, match="does not exist"):
        faithfulness(toy, batch, Circuit.of([(toy.cfg.n_layers, 0)], task="ioi", model="toy"))
    with pytest.raises(ValueError, match="reference"):
        faithfulness(toy, batch, Circuit.of([(0, 0)], task="ioi", model="toy"), reference="nope")


@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_discover_circuit_reaches_target_with_smallest_k(toy, task):
    result = discover_circuit(toy, task, n_prompts=8, target=0.8)
    k = result.meta["top_k"]
    assert len(result.circuit) == k
    if result.meta["reached_target"]:
        assert result.faithfulness["faithfulness"] >= 0.8
        assert all(f < 0.8 for kk, f in result.curve.items() if 0 < kk < k)  # nothing smaller reaches it
    assert set(result.timings) >= {"act_patch", "attribution", "path_patch", "faithfulness"}
    json.loads(json.dumps(result.to_dict()))
    if (TOY_DIR / "model.safetensors").exists():  # the embedded model has a faithful *proper* sub-circuit
        assert result.meta["reached_target"] and len(result.circuit) < toy.cfg.n_layers * toy.cfg.n_heads
