"""Cross-task ablation and the reuse analysis (circuitlib.reuse) against the oracle and direct calls."""

import json
import math

import numpy as np
import pytest
import torch

from circuitlib import overlap, reuse
from circuitlib.interventions import control_sets, live_heads
from circuitlib.tasks import ioi_batch, task_batch
from circuitlib.types import Circuit, HeadScores
from builders import random_reuse_inputs
from oracle import ablate


def test_cross_task_ablation_matches_oracle_and_p_from_draws(toy):
    batch = ioi_batch(toy.tokenizer, 16, seed=0)
    layer0 = [hd for hd in live_heads(toy) if hd[0] == 0]
    assert len(layer0) >= 4  # precondition: two layer-0 heads in the circuit, at least two left for the sets
    heads = layer0[:2]
    res = reuse.cross_task_ablation(toy, Circuit.of(heads, "x", "toy"), batch, n_random=50)
    clean, _ = ablate(toy, batch, [])
    with torch.no_grad():
        corrupt_logits = toy(batch.corrupt)
    rows = torch.arange(len(batch))
    ld_c = float((corrupt_logits[rows, batch.end, batch.answer] - corrupt_logits[rows, batch.end, batch.wrong]).mean())
    diff, top1 = ablate(toy, batch, heads)
    norm = (float(diff.mean()) - ld_c) / (float(clean.mean()) - ld_c)
    assert res.ablated["normalised"] == pytest.approx(norm, abs=2e-3)
    assert res.ablated["top1_accuracy"] == pytest.approx(float(top1.float().mean()))
    # the random sets: layer-matched live heads outside the circuit (two of layer 0's other live heads; every
    # pair when there are at most 50 pairs)
    n_pairs = math.comb(len(layer0) - 2, 2)
    draws = control_sets(toy, heads, 50)
    live = set(live_heads(toy))
    norms = []
    for s in draws.sets:
        assert sorted(l for l, _ in s) == [0, 0] and not set(s) & set(heads) and set(s) <= live
        d, _ = ablate(toy, batch, s)
        norms.append((float(d.mean()) - ld_c) / (float(clean.mean()) - ld_c))
    assert draws.exhaustive == (n_pairs <= 50) and len(draws) == min(n_pairs, 50)
    assert len({frozenset(s) for s in draws.sets}) == len(draws)
    hits = sum(n <= norm + 1e-6 for n in norms)
    assert res.p_value == pytest.approx((1 + hits) / (1 + len(norms)))
    assert res.random_mean["normalised"] == pytest.approx(np.mean(norms), abs=2e-3)
    json.loads(res.to_json())
    with pytest.raises(ValueError, match="does not exist"):
        reuse.cross_task_ablation(toy, [(5, 0)], batch)


def test_random_controls_fall_back_when_a_layer_is_short(toy):
    """Heads under test that use up every live head of their layer leave no layer-matched set: the controls
    fall back to size-matched sets of other live heads, and ``how`` says so and names the short layer."""
    live = live_heads(toy)
    per_layer = {l: [hd for hd in live if hd[0] == l] for l in range(toy.cfg.n_layers)}
    layer = min((l for l in per_layer if per_layer[l]), key=lambda l: len(per_layer[l]))  # fewest live heads
    heads = per_layer[layer]  # all of them: none left in that layer for a layer-matched set
    k, rest = len(heads), sorted(set(live) - set(heads))
    assert len(rest) >= k and math.comb(len(rest), k) > 20  # precondition: size-matched sets exist, 20 draws
    d = control_sets(toy, heads, 20)
    assert "not layer-matched" in d.how and f"layer {layer} has 0 other live heads in the pool, needs {k}" in d.how
    assert len(d) == 20 and not d.exhaustive and len({frozenset(s) for s in d.sets}) > 1
    assert all(len(s) == k == len(set(s)) and set(s) <= set(rest) for s in d.sets)  # live heads outside `heads`


def test_random_controls_name_extra_exclusions_given_as_a_generator(toy):
    """``also_exclude`` is read twice (the heads excluded, then the note in ``how``): a one-shot iterable, which
    its ``Iterable[Head]`` annotation allows, used to be excluded but left out of ``how``."""
    heads, extra = [(0, 0)], [(0, 2), (1, 6)]
    listed = control_sets(toy, heads, 20, also_exclude=extra)
    streamed = control_sets(toy, heads, 20, also_exclude=(h for h in extra))
    assert "also excluding 0.2, 1.6" in listed.how
    assert streamed.how == listed.how and streamed.sets == listed.sets
    assert not any(set(s) & {(0, 2), (1, 6)} for s in streamed.sets)


def test_reuse_analysis_cells_equal_direct_calls(toy):
    rel, patch, circuits, batches = random_reuse_inputs(toy)
    res = reuse.reuse_analysis(toy, rel, patch, circuits, batches, n_random=20, n_permutations=20_000)
    live = live_heads(toy)
    pair = res.pairs["ioi|capitals"]
    assert pair.circuits == overlap.set_overlap(circuits["ioi"], circuits["capitals"], 24)
    # item access reads the JSON form, as the dicts these results replaced did
    assert pair["circuits"] == overlap.set_overlap(circuits["ioi"], circuits["capitals"], 24).to_dict()
    assert set(pair) == {"circuits", "patching", "maps", "maps_top", "maps_topk_curve"}
    direct = overlap.rank_correlation(rel["ioi"], rel["capitals"], heads=live)
    assert res.pairs["ioi|capitals"]["maps"]["rho"] == pytest.approx(direct["rho"])
    assert res.pairs["ioi|capitals"]["maps"]["p_value"] == pytest.approx(direct["p_value"])
    cell = reuse.cross_task_ablation(toy, circuits["ioi"], batches["capitals"], n_random=20, exclude=circuits["capitals"])
    assert res.reuse["ioi"]["capitals"].to_dict() == cell.to_dict()
    assert res.reuse.cell("ioi", "capitals") is res.reuse["ioi"]["capitals"]
    assert list(res.reuse) == ["ioi", "capitals"] and list(res.reuse["capitals"]) == ["ioi", "capitals"]
    # off the diagonal no random set holds a head of the measured task's circuit
    cap = {f"{l}.{h}" for l, h in circuits["capitals"].heads}
    assert all(not cap & set(s) for s in res.reuse["ioi"]["capitals"].random_sets)
    same = reuse.cross_task_ablation(toy, circuits["ioi"], batches["ioi"], n_random=20)
    assert res.reuse["ioi"]["ioi"].to_dict() == same.to_dict()
    # the MAPS vs patching row compares |patching| (as labelled)
    direct_mp = overlap.rank_correlation(rel["ioi"], patch["ioi"], heads=live, absolute=True)
    assert res.per_task["ioi"]["maps_vs_patching"]["rho"] == pytest.approx(direct_mp["rho"])
    # 20 draws cannot reach the corrected bar: those rows are kept apart from the family
    assert res.apart is not None and len(res.apart.rows) == 4
    assert not any("remove" in r.name for r in res.table.rows)
    names = [r.name for r in res.table.rows]
    assert "circuits ioi vs capitals: shared heads" in names
    d = json.loads(res.to_json())
    assert d["reuse"]["ioi"]["capitals"] == json.loads(cell.to_json())  # JSON nesting {circuit: {task: cell}}
    assert d["pairs"]["ioi|capitals"]["maps"]["rho"] == pytest.approx(direct["rho"])
    assert d["per_task"]["ioi"]["maps_vs_patching"]["rho"] == pytest.approx(direct_mp["rho"])


def test_cross_task_ablation_of_every_head_has_no_random_sets(toy):
    batch = ioi_batch(toy.tokenizer, 8, seed=0)
    every = [(l, h) for l in range(3) for h in range(8)]
    res = reuse.cross_task_ablation(toy, every, batch, n_random=10)
    assert res.n_random == 0 and res.p_value is None and res.p_how.startswith("no control sets")


def test_no_control_when_too_few_live_heads_remain_never_dead_heads(toy):
    """A 3-head set ablated on IOI with all but 2 of the other live heads excluded: the live heads left
    (counted here from the OV norms) are fewer than 3, so there is no control and no p. The old fallback
    filled the sets with switched-off heads (1,140 sets, 816 of them dead-only on the 6-live-head model): a
    live-vs-dead null that looked significant."""
    ov = torch.einsum("lhde,lhem->lhdm", toy.W_V, toy.W_O).flatten(-2).norm(dim=-1).detach()
    live = {(l, h) for l in range(3) for h in range(8) if ov[l, h] >= 1e-3 * ov.max()}  # live_heads' rule
    batch = ioi_batch(toy.tokenizer, 8, seed=0)
    ranked = sorted(live, key=lambda hd: -float(ov[hd]))
    assert len(live) >= 6  # precondition: a circuit of 3, at least one excluded head, 2 left
    circuit, exclude = ranked[:3], ranked[3:len(live) - 2]  # leaves 2 live heads
    res = reuse.cross_task_ablation(toy, circuit, batch, n_random=2000, exclude=exclude)
    left = live - set(circuit) - set(exclude)
    assert len(left) == 2
    assert res.n_random == 0 and res.random_sets == [] and res.p_value is None and res.random_mean == {}
    assert res.p_how.startswith("no control sets") and f"only {len(left)} live head" in res.p_how
    # the ablation itself is still measured, against the oracle
    diff, _ = ablate(toy, batch, circuit)
    clean, _ = ablate(toy, batch, [])
    assert res.ablated["logit_diff"] == pytest.approx(float(diff.mean()), abs=2e-3)
    assert res.clean["logit_diff"] == pytest.approx(float(clean.mean()), abs=2e-3)
    # with nothing else excluded, sets exist and hold only live heads outside the circuit
    res2 = reuse.cross_task_ablation(toy, circuit, batch, n_random=2000)
    names = {f"{l}.{h}" for l, h in live - set(circuit)}
    assert len(names) >= 3 and res2.n_random > 0 and res2.p_value is not None
    assert all(set(s) <= names for s in res2.random_sets)


def test_reuse_analysis_reports_untested_cells_in_its_notes(toy):
    ov = torch.einsum("lhde,lhem->lhdm", toy.W_V, toy.W_O).flatten(-2).norm(dim=-1).detach()
    ranked = sorted(((l, h) for l in range(3) for h in range(8)), key=lambda hd: -float(ov[hd]))
    g = torch.Generator().manual_seed(1)
    rel = {"ioi": HeadScores(torch.rand(3, 8, generator=g), "maps_static", "name_copying", "toy"),
           "capitals": HeadScores(torch.rand(3, 8, generator=g), "maps_static", "country_to_capital_wikidata", "toy")}
    patch = {t: HeadScores(torch.randn(3, 8, generator=g), "act_patch", t, "toy") for t in rel}
    n_live = len(live_heads(toy))
    # capitals' 3 heads measured on IOI, IOI's head set excluded: 2 live heads left, no control set
    circuits = {"ioi": Circuit.of(ranked[3:n_live - 2], "ioi", "toy"), "capitals": Circuit.of(ranked[:3], "capitals", "toy")}
    batches = {t: task_batch(t, toy.tokenizer, 8, seed=0) for t in rel}
    res = reuse.reuse_analysis(toy, rel, patch, circuits, batches, n_random=20)
    cell = res.reuse["capitals"]["ioi"]
    assert cell.p_value is None
    assert any(n.startswith("remove capitals circuit -> ioi: not tested (no control sets") for n in res.notes)
    every = [r.name for r in res.table.rows] + ([r.name for r in res.apart.rows] if res.apart else [])
    assert "remove capitals circuit -> ioi: normalised logit diff vs random sets" not in every


def test_cross_task_ablation_with_clean_equal_to_corrupt_is_one_clear_error(toy):
    """clean == corrupt makes the normalised logit difference 0/0: one ValueError naming it, not inf / nan."""
    import dataclasses

    batch = ioi_batch(toy.tokenizer, 8, seed=0)
    same = dataclasses.replace(batch, corrupt=batch.clean.clone())
    with pytest.raises(ValueError, match="normalised metric is undefined"):
        reuse.cross_task_ablation(toy, [(0, 0)], same, n_random=5)
