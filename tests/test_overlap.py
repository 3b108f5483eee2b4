"""Overlap statistics against scipy and brute-force references; invariances; cross-task ablation."""

import itertools
import json
from math import comb

import numpy as np
import pytest
import torch
from scipy import stats

from circuitlib import overlap, reuse
from circuitlib.types import Circuit, HeadScores


def _hs(values, target="t", method="m"):
    return HeadScores(torch.as_tensor(values, dtype=torch.float32), method, target, "test")


def _random_hs(seed, shape=(6, 8), target="t"):
    g = torch.Generator().manual_seed(seed)
    return _hs(torch.rand(*shape, generator=g), target)


def test_hypergeom_p_matches_scipy_and_brute_force():
    # tiny case: 7 heads, a = 3 heads; count all size-4 sets b by their overlap with a
    n, a = 7, {0, 1, 2}
    counts = {}
    for b in itertools.combinations(range(n), 4):
        x = len(a & set(b))
        counts[x] = counts.get(x, 0) + 1
    total = comb(n, 4)
    for observed in range(0, 4):
        brute = sum(c for x, c in counts.items() if x >= observed) / total
        assert overlap.hypergeom_p(observed, n, 3, 4) == pytest.approx(brute)
        assert overlap.hypergeom_p(observed, n, 3, 4) == pytest.approx(stats.hypergeom(n, 3, 4).sf(observed - 1))
    assert overlap.hypergeom_p(0, n, 3, 4) == 1.0


def test_set_overlap_values_and_symmetry():
    a = [(0, 0), (0, 1), (1, 2), (2, 3)]
    b = Circuit.of(["0.1", "1.2", "2.0"], "ioi", "test")
    res = overlap.set_overlap(a, b, 24)
    assert res["intersection"] == ["0.1", "1.2"]
    assert res["jaccard"] == pytest.approx(2 / 5)
    assert res["overlap_coefficient"] == pytest.approx(2 / 3)
    assert res["expected"] == pytest.approx(4 * 3 / 24)
    assert res["p_value"] == pytest.approx(stats.hypergeom(24, 4, 3).sf(1))
    swapped = overlap.set_overlap(b, a, 24)
    for key in ("jaccard", "overlap_coefficient", "p_value", "expected", "intersection"):
        assert swapped[key] == pytest.approx(res[key]) if isinstance(res[key], float) else swapped[key] == res[key]
    json.dumps(res)


def test_set_overlap_edge_cases():
    empty = overlap.set_overlap([], [(0, 0)], 10)
    assert (empty["jaccard"], empty["overlap_coefficient"], empty["p_value"]) == (0.0, 0.0, 1.0)
    both = overlap.set_overlap([], [], 10)
    assert (both["jaccard"], both["overlap_coefficient"], both["p_value"]) == (0.0, 0.0, 1.0)
    same = overlap.set_overlap(["0.0", "0.1"], [(0, 0), (0, 1)], 10)
    assert same["jaccard"] == 1.0 and same["overlap_coefficient"] == 1.0
    assert same["p_value"] == pytest.approx(1 / comb(10, 2))
    with pytest.raises(ValueError, match="n_total"):
        overlap.set_overlap([(0, 0), (0, 1)], [(1, 1)], 2)
    with pytest.raises(ValueError, match="top-k"):
        overlap.set_overlap(_random_hs(0), [(0, 0)], 48)


def test_rank_correlation_matches_spearman_and_is_invariant():
    a, b = _random_hs(0), _random_hs(1)
    b = _hs(0.5 * a.scores + b.scores)  # correlated
    res = overlap.rank_correlation(a, b, n_permutations=2000)
    rho_ref = stats.spearmanr(a.scores.flatten(), b.scores.flatten()).statistic
    assert res["rho"] == pytest.approx(rho_ref, abs=1e-9)
    # swapping the arguments and monotone transforms change nothing
    assert overlap.rank_correlation(b, a, n_permutations=2000)["rho"] == pytest.approx(res["rho"])
    warped = overlap.rank_correlation(_hs(torch.exp(3 * a.scores)), _hs(b.scores ** 3), n_permutations=2000)
    assert warped["rho"] == pytest.approx(res["rho"]) and warped["p_value"] == res["p_value"]
    # ties: average ranks, as scipy
    ta, tb = _hs(torch.round(a.scores * 3)), _hs(torch.round(b.scores * 3))
    tied_ref = stats.spearmanr(ta.scores.flatten(), tb.scores.flatten()).statistic
    assert overlap.rank_correlation(ta, tb, n_permutations=10)["rho"] == pytest.approx(tied_ref, abs=1e-9)


def test_permutation_p_values():
    a = _random_hs(0)
    same = overlap.rank_correlation(a, a, n_permutations=999)
    assert same["rho"] == pytest.approx(1.0)
    assert same["p_value"] == pytest.approx(1 / 1000)  # no permutation reaches rho = 1
    ps = [overlap.rank_correlation(_random_hs(s), _random_hs(100 + s), n_permutations=999, seed=s)["p_value"]
          for s in range(20)]
    assert all(0 < p <= 1 for p in ps)
    assert np.median(ps) > 0.2  # independent scores: p roughly uniform, not small
    # the permutation p agrees with scipy's asymptotic p for a moderate correlation
    b = _hs(0.3 * a.scores + _random_hs(7).scores)
    ours = overlap.rank_correlation(a, b, n_permutations=20000)
    assert ours["p_value"] == pytest.approx(stats.spearmanr(a.scores.flatten(), b.scores.flatten()).pvalue, abs=0.02)
    const = overlap.rank_correlation(_hs(torch.zeros(6, 8)), a)
    assert const["rho"] is None and const["p_value"] is None


def test_within_layer_permutations_remove_a_pure_layer_effect():
    # scores that differ only by layer (plus independent noise within layers) correlate across heads,
    # but not beyond the layer effect: the all-heads p is tiny, the within-layer p is not
    g = torch.Generator().manual_seed(0)
    layer_level = torch.arange(6.0)[:, None] * 10
    a = _hs(layer_level + torch.rand(6, 8, generator=g))
    b = _hs(layer_level + torch.rand(6, 8, generator=g))
    plain = overlap.rank_correlation(a, b, n_permutations=2000)
    strat = overlap.rank_correlation(a, b, n_permutations=2000, within_layers=True)
    assert plain["rho"] == strat["rho"] > 0.8
    assert plain["p_value"] < 0.01 and strat["p_value"] > 0.05
    same = overlap.rank_correlation(a, a, n_permutations=500, within_layers=True)
    assert same["p_value"] == pytest.approx(1 / 501)


def test_topk_curve_against_naive_sets():
    a, b = _random_hs(0), _random_hs(1)
    curve = overlap.topk_overlap_curve(a, b)
    n = 48
    assert curve["k"] == list(range(1, n + 1))
    for k, obs, exp, p in zip(curve["k"], curve["observed"], curve["expected"], curve["p_value"]):
        naive = len(set(a.top(k)) & set(b.top(k)))  # no ties in continuous scores: same sets
        assert obs == naive
        assert exp == pytest.approx(k * k / n)
        assert p == pytest.approx(stats.hypergeom(n, k, k).sf(obs - 1))
    assert curve["observed"][-1] == n
    same = overlap.topk_overlap_curve(a, a, ks=[1, 5, 10])
    assert same["observed"] == [1, 5, 10] and same["p_value"][-1] < 1e-6
    with pytest.raises(ValueError, match="1..48"):
        overlap.topk_overlap_curve(a, b, ks=[0])


def test_ties_are_not_broken_by_head_index():
    # both scorings: one clear top head each, everything else tied at 0. Breaking ties by index
    # would put the same low-index heads in both top-10 sets; random tie-breaking must not.
    za, zb = torch.zeros(6, 8), torch.zeros(6, 8)
    za[5, 7], zb[4, 0] = 1.0, 1.0
    curve = overlap.topk_overlap_curve(_hs(za), _hs(zb), ks=[10])
    by_index = len(set(_hs(za).top(10)) & set(_hs(zb).top(10)))
    assert by_index >= 8
    assert curve["observed"][0] < by_index


def test_compare_dispatch_and_json():
    a, b = _random_hs(0, target="x"), _random_hs(1, target="y")
    res = overlap.compare(a, b, n_permutations=500)
    assert res["kind"] == "scores_vs_scores" and res["top_k"] == overlap.default_top_k(48)
    assert res["set"]["size_a"] == res["set"]["size_b"] == res["top_k"]
    assert res["rank"]["rho"] == overlap.rank_correlation(a, b, n_permutations=500)["rho"]
    json.dumps(res)

    circuit = Circuit.of(a.top(4), "ioi", "test")  # a's own top heads
    sv = overlap.compare(a, circuit)
    assert sv["kind"] == "scores_vs_set" and sv["top_k"] == 4
    assert sv["set"]["jaccard"] == 1.0
    assert sv["rank_test"]["auroc"] == 1.0 and sv["rank_test"]["p_value"] < 0.01
    assert overlap.compare(circuit, a)["set"]["p_value"] == sv["set"]["p_value"]
    json.dumps(sv)

    ss = overlap.compare(circuit, [(0, 0)], n_total=48)
    assert ss["kind"] == "set_vs_set"
    with pytest.raises(ValueError, match="n_total"):
        overlap.compare(circuit, [(0, 0)])
    with pytest.raises(ValueError, match="different heads"):
        overlap.compare(a, _random_hs(2, shape=(3, 8)))


def test_circuit_rank_test_matches_auroc_definition():
    s = _random_hs(3)
    heads = [(0, 1), (2, 2), (5, 7)]
    res = overlap.circuit_rank_test(s, heads)
    inside = np.array([s[h] for h in heads])
    outside = np.array([s[(l, h)] for l in range(6) for h in range(8) if (l, h) not in heads])
    naive = np.mean([(i > o) + 0.5 * (i == o) for i in inside for o in outside])
    assert res["auroc"] == pytest.approx(naive)
