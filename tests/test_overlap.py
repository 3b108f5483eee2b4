"""Overlap statistics against independent references: brute-force enumeration (itertools), scipy
(spearmanr for rho, hypergeom, permutation_test), hand-computed Holm, closed-form counts."""

import dataclasses
import itertools
import json
from math import comb, factorial

import numpy as np
import pytest
import torch
from scipy import stats

from circuitlib import overlap
from circuitlib.types import Circuit, HeadScores


def _hs(values, target="t", method="m"):
    return HeadScores(torch.as_tensor(values, dtype=torch.float32), method, target, "test")


def _random_hs(seed, shape=(6, 8), target="t"):
    g = torch.Generator().manual_seed(seed)
    return _hs(torch.rand(*shape, generator=g), target)


def _vals(x: HeadScores) -> np.ndarray:
    """The float32 scores as float64, as circuitlib sees them."""
    return x.scores.flatten().double().numpy()


def _brute_spearman_p(x, y, relabellings):
    """Two-sided p and min p by brute force: scipy's rho for every relabelling of y."""
    obs = stats.spearmanr(x, y).statistic
    null = np.abs([stats.spearmanr(x, y[list(p)]).statistic for p in relabellings])
    tol = 1e-9
    return (null >= abs(obs) - tol).mean(), (null >= null.max() - tol).mean(), len(null)


# --- set overlap (hypergeometric) ------------------------------------------------------------------


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
    assert overlap.hypergeom_p(0, n, 3, 4) == 1.0
    # the smallest p two sets of sizes 3 and 4 can reach: full overlap of the 3, counted above
    res = overlap.set_overlap([(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5), (0, 6)], n)
    assert res["min_p"] == pytest.approx(counts[3] / total)
    assert res["p_value"] == 1.0 and res["p_method"] == "exact, hypergeometric"


def test_set_overlap_values_and_symmetry():
    a = [(0, 0), (0, 1), (1, 2), (2, 3)]
    b = Circuit.of(["0.1", "1.2", "2.0"], "ioi", "test")
    res = overlap.set_overlap(a, b, 24)
    assert res["intersection"] == ["0.1", "1.2"]
    assert res["jaccard"] == pytest.approx(2 / 5)
    assert res["overlap_coefficient"] == pytest.approx(2 / 3)
    assert res["expected"] == pytest.approx(4 * 3 / 24)
    # P(X >= 2), 3 draws from 24 with 4 marked: (C(4,2) C(20,1) + C(4,3)) / C(24,3)
    assert res["p_value"] == pytest.approx((comb(4, 2) * 20 + comb(4, 3)) / comb(24, 3))
    assert res["min_p"] == pytest.approx(comb(4, 3) / comb(24, 3))
    swapped = overlap.set_overlap(b, a, 24)
    for key in ("jaccard", "overlap_coefficient", "p_value", "expected", "intersection", "min_p"):
        assert swapped[key] == pytest.approx(res[key]) if isinstance(res[key], float) else swapped[key] == res[key]
    assert res.intersection == ("0.1", "1.2") and res.size_intersection == 2  # a typed result, also read as a mapping
    assert json.loads(res.to_json()) == dict(res) and dict(res)["intersection"] == ["0.1", "1.2"]


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


@pytest.mark.bad_input
def test_set_overlap_of_head_scores_is_a_clear_error():
    with pytest.raises(ValueError, match="top-k"):
        overlap.set_overlap(_random_hs(0), [(0, 0)], 48)


# --- the permutation engine ------------------------------------------------------------------------


def test_block_permutations_enumerate_each_relabelling_once():
    perms = overlap.BlockPermutations(7, [[0, 2, 4], [1, 5], [6]])  # 3! * 2! = 12; 3 stays, 6 is alone
    rows = np.concatenate(list(perms.batches(5)))  # batch size that does not divide the count
    assert perms.count == 12 and rows.shape == (12, 7)
    assert len({tuple(r) for r in rows}) == 12
    assert (rows[0] == np.arange(7)).all()  # the observed labelling is one of them
    assert set(rows[:, 3]) == {3} and set(rows[:, 6]) == {6}
    assert all(set(r[[0, 2, 4]]) == {0, 2, 4} and set(r[[1, 5]]) == {1, 5} for r in rows)
    drawn = perms.sample(np.random.default_rng(0), 2000)
    assert {tuple(r) for r in drawn} == {tuple(r) for r in rows}  # 2000 draws of 12: all seen, nothing else
    labels = overlap.Labellings(6, [4, 1])
    combos = np.concatenate(list(labels.batches(4)))
    assert labels.count == 15 and {tuple(c) for c in combos} == set(itertools.combinations(range(6), 2))
    with pytest.raises(ValueError, match="disjoint"):
        overlap.BlockPermutations(4, [[0, 1], [1, 2]])


def test_spearman_exact_on_six_heads_matches_brute_force_and_scipy_permutation_test():
    x = np.array([0.3, 1.2, -0.5, 0.9, 2.0, 0.1])
    y = np.array([0.2, 0.8, 0.1, 1.5, 1.1, -0.3])
    res = overlap.rank_correlation(_hs(x[None]), _hs(y[None]))
    assert res["rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    p, min_p, count = _brute_spearman_p(x, y, itertools.permutations(range(6)))
    assert (res["p_value"], res["min_p"], res["n_permutations"]) == (pytest.approx(p), pytest.approx(min_p), count)
    assert count == 720 and res["min_p"] == pytest.approx(2 / 720)  # no ties: only rho = +1 and -1 reach |rho| = 1
    assert res["exact"] is True and res["p_method"] == "exact, 720 permutations"
    # scipy's own permutation test, exact because n_resamples >= 6! (it enumerates all pairings)
    ref = stats.permutation_test((x,), lambda xs: abs(stats.spearmanr(xs, y).statistic), vectorized=False,
                                 permutation_type="pairings", n_resamples=np.inf, alternative="greater")
    assert res["p_value"] == pytest.approx(ref.pvalue)


def test_notebook_six_live_heads_example():
    # notebook 04's live heads (0.0, 0.1, 0.2, 0.4, 0.5, 1.6): MAPS copying and capital scores as printed there;
    # the capital scores tie at 0.00 (heads 0.4 and 1.6)
    copying = np.array([1.00, 0.62, 0.42, 0.01, 0.88, 0.00])
    capital = np.array([1.00, 0.76, 0.38, 0.00, 0.97, 0.00])
    grid_a, grid_b = np.zeros((2, 8)), np.zeros((2, 8))
    live = [(0, 0), (0, 1), (0, 2), (0, 4), (0, 5), (1, 6)]
    for (l, h), u, v in zip(live, copying, capital):
        grid_a[l, h], grid_b[l, h] = u, v
    res = overlap.rank_correlation(_hs(grid_a), _hs(grid_b), heads=live)
    assert res["rho"] == pytest.approx(0.9856, abs=1e-4)  # the rho the notebook printed
    p, min_p, _ = _brute_spearman_p(copying, capital, itertools.permutations(range(6)))
    assert res["p_value"] == pytest.approx(p) == pytest.approx(4 / 720)  # identity, the tie swap, and their reverses
    assert res["min_p"] == pytest.approx(min_p) == pytest.approx(4 / 720)  # the tie keeps |rho| below 1
    assert stats.spearmanr(copying, capital).pvalue < 0.001  # the asymptotic p the notebook called exact: 16x too small
    assert res["heads"] == ["0.0", "0.1", "0.2", "0.4", "0.5", "1.6"]
    # in an 18-test family it cannot pass the first bar, 0.05 / 18 < 4/720: under Bonferroni never, under
    # Holm only if other tests are rejected before it
    row = overlap.TestRow.from_result("live heads: MAPS copying vs capital", res, statistic="rho")
    assert (row.value, row.n, row.how) == (res["rho"], 6, "exact, 720 permutations")
    weak = [overlap.TestRow(f"t{i}", "x", 0.0, 0.5, "exact", 10, 1e-6) for i in range(17)]
    strong = [overlap.TestRow(f"t{i}", "x", 0.0, 1e-6, "exact", 10, 1e-6) for i in range(17)]
    assert overlap.test_table([row, *weak]).can_reach[0] is False
    assert overlap.test_table([row, *strong], correction="bonferroni").can_reach[0] is False
    assert overlap.test_table([row, *strong]).significant[0] is True  # Holm's bar for the 18th: 0.05


def test_six_untied_heads_reach_0_05_over_18_only_with_a_perfect_ordering():
    x = np.arange(6.0)
    perfect = overlap.rank_correlation(_hs(x[None]), _hs(x[None] ** 3))
    assert perfect["rho"] == pytest.approx(1.0) and perfect["p_value"] == perfect["min_p"] == pytest.approx(2 / 720)
    # 2/720 = 1/360 = 0.05/18 exactly: a strict bar (p < 0.05/18, notebook 04's Bonferroni column) is out of
    # reach at n = 6; Holm / Bonferroni with p <= alpha reach it only at |rho| = 1
    assert not 2 / 720 < 0.05 / 18
    one_swap = overlap.rank_correlation(_hs(x[None]), _hs(np.array([[0, 1, 2, 3, 5, 4.0]])))
    p_swap, _, _ = _brute_spearman_p(x, np.array([0, 1, 2, 3, 5, 4.0]), itertools.permutations(range(6)))
    assert one_swap["p_value"] == pytest.approx(p_swap) and one_swap["p_value"] > 0.05 / 18
    filler = [overlap.TestRow(f"t{i}", "x", 0.0, 0.5, "exact", 10, 1e-6) for i in range(17)]
    for rows, reach in ((18, True), (19, False)):
        tab = overlap.test_table([overlap.TestRow.from_result("6 heads", one_swap, statistic="rho"),
                                  *filler, *filler[: rows - 18]])
        assert tab.can_reach[0] is reach and tab.significant[0] is False
    at_bar = overlap.test_table([overlap.TestRow.from_result("6 heads, rho = 1", perfect, statistic="rho"), *filler])
    assert at_bar.adjusted_p[0] == pytest.approx(0.05) and at_bar.significant[0] is True  # p <= alpha passes
    five = overlap.rank_correlation(_hs(x[None, :5]), _hs(x[None, :5]))
    assert five["min_p"] == pytest.approx(2 / 120)
    assert overlap.test_table([overlap.TestRow.from_result("5 heads", five, statistic="rho"), *filler]).can_reach[0] is False


def test_spearman_within_layers_on_a_head_subset_matches_brute_force():
    a, b = _random_hs(3, shape=(3, 5)), _random_hs(4, shape=(3, 5))
    heads = [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (2, 0), (2, 1), (2, 4)]  # layers of 3, 2, 3 heads: 6*2*6 = 72
    res = overlap.rank_correlation(a, b, heads=heads, within_layers=True)
    x = np.array([a[h] for h in heads])
    y = np.array([b[h] for h in heads])
    assert res["rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)
    layer_slots = [[0, 1, 2], [3, 4], [5, 6, 7]]
    relabellings = []
    for parts in itertools.product(*(itertools.permutations(s) for s in layer_slots)):
        relabellings.append([i for part in parts for i in part])
    p, min_p, count = _brute_spearman_p(x, y, relabellings)
    assert count == 72 and res["n_permutations"] == 72 and res["p_method"] == "exact, 72 permutations"
    assert res["p_value"] == pytest.approx(p) and res["min_p"] == pytest.approx(min_p)
    # over all 8 heads instead: 8! = 40,320 <= 50,000, still exact, and the same as brute force
    allh = overlap.rank_correlation(a, b, heads=heads)
    assert allh["n_permutations"] == factorial(8) and allh["exact"] is True
    ry = stats.rankdata(y) - 4.5

    def abs_rho(xs, axis=-1):  # vectorised over scipy's batches of pairings: |Pearson r| of the ranks
        rx = stats.rankdata(xs, axis=-1) - 4.5
        return np.abs((rx * ry).sum(-1) / np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum()))

    ref = stats.permutation_test((x,), abs_rho, vectorized=True, permutation_type="pairings", n_resamples=np.inf,
                                 alternative="greater")
    assert allh["p_value"] == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError, match="outside the 3x5"):
        overlap.rank_correlation(a, b, heads=[(3, 0)])


def test_spearman_monte_carlo_agrees_with_exact_enumeration():
    # 9 heads: 9! = 362,880 > 50,000, so Monte Carlo; the exact p by enumerating all of them with
    # the no-ties formula rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    rng = np.random.default_rng(5)
    x = rng.permutation(9).astype(float)
    y = x + rng.normal(0, 3.5, 9)
    res = overlap.rank_correlation(_hs(x[None]), _hs(y[None]))
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    perms = np.array(list(itertools.permutations(range(9))))
    null = 1 - 6 * ((rx[None, :] - ry[perms]) ** 2).sum(1) / (9 * 80)
    rho = 1 - 6 * ((rx - ry) ** 2).sum() / (9 * 80)
    exact = (np.abs(null) >= abs(rho) - 1e-9).mean()
    assert res["rho"] == pytest.approx(rho)
    assert 0.02 < exact < 0.5  # a p the check below can resolve
    assert res["exact"] is False and res["p_method"] == "Monte Carlo, 20,000 permutations, +1 correction"
    assert res["n_permutations"] == 20_000 and res["min_p"] == pytest.approx(1 / 20_001)
    assert abs(res["p_value"] - exact) < 4 * np.sqrt(exact * (1 - exact) / 20_000)
    for n in (9, 4):  # refused for Monte Carlo and, so the same call cannot fail only on larger inputs, when exact
        with pytest.raises(ValueError, match="20,000"):
            overlap.rank_correlation(_hs(x[None, :n]), _hs(y[None, :n]), n_permutations=5000)


def test_monte_carlo_plus_one_correction():
    # rho(a, a) = 1; among 48! (or (8!)^6 within-layer) relabellings only the identity and (all heads)
    # the reversal reach it, so no random draw does: p = (1 + 0) / (1 + 20,000)
    a = _random_hs(0)
    for within in (False, True):
        same = overlap.rank_correlation(a, a, within_layers=within)
        assert same["rho"] == pytest.approx(1.0) and same["p_value"] == pytest.approx(1 / 20_001)
    bigger = overlap.rank_correlation(a, a, n_permutations=30_000)
    assert bigger["p_value"] == pytest.approx(1 / 30_001) and bigger["p_method"].startswith("Monte Carlo, 30,000")


def test_rank_correlation_matches_spearman_and_is_invariant():
    a, b = _random_hs(0), _random_hs(1)
    b = _hs(0.5 * a.scores + b.scores)  # correlated
    res = overlap.rank_correlation(a, b)
    rho_ref = stats.spearmanr(_vals(a), _vals(b)).statistic
    assert res["rho"] == pytest.approx(rho_ref, abs=1e-9)
    # a rank statistic: swapping the arguments and monotone transforms change neither rho nor p
    assert overlap.rank_correlation(b, a)["rho"] == pytest.approx(res["rho"])
    warped = overlap.rank_correlation(_hs(torch.exp(3 * a.scores)), _hs(b.scores ** 3))
    assert warped["rho"] == pytest.approx(res["rho"]) and warped["p_value"] == res["p_value"]
    # ties: average ranks, as scipy
    ta, tb = _hs(torch.round(a.scores * 3)), _hs(torch.round(b.scores * 3))
    assert overlap.rank_correlation(ta, tb)["rho"] == pytest.approx(stats.spearmanr(_vals(ta), _vals(tb)).statistic, abs=1e-9)
    # at n = 48 the permutation p and scipy's asymptotic p agree (the asymptotics are fine there, not at n = 6)
    c = _hs(0.3 * a.scores + _random_hs(7).scores)
    assert overlap.rank_correlation(a, c)["p_value"] == pytest.approx(stats.spearmanr(_vals(a), _vals(c)).pvalue, abs=0.01)
    const = overlap.rank_correlation(_hs(torch.zeros(6, 8)), a)
    assert const["rho"] is None and const["p_value"] is None and "constant" in const["note"]


def test_within_layer_permutations_remove_a_pure_layer_effect():
    # scores that differ only by layer (plus independent noise within layers) correlate across heads,
    # but not beyond the layer effect: the all-heads p is tiny, the within-layer p is not
    g = torch.Generator().manual_seed(0)
    layer_level = torch.arange(6.0)[:, None] * 10
    a = _hs(layer_level + torch.rand(6, 8, generator=g))
    b = _hs(layer_level + torch.rand(6, 8, generator=g))
    plain = overlap.rank_correlation(a, b)
    strat = overlap.rank_correlation(a, b, within_layers=True)
    assert plain["rho"] == strat["rho"] > 0.8
    assert plain["p_value"] < 0.01 and strat["p_value"] > 0.05


# --- circuit rank test (AUROC) ---------------------------------------------------------------------


def _naive_auroc(inside, outside):
    return np.mean([(i > o) + 0.5 * (i == o) for i in inside for o in outside])


def test_circuit_rank_test_exact_matches_brute_force_and_scipy_with_ties():
    s = _hs(torch.round(_random_hs(3, shape=(3, 4)).scores * 4) / 4)  # 12 heads, many ties
    heads = [(0, 1), (1, 2), (2, 0), (2, 3)]
    res = overlap.circuit_rank_test(s, heads)
    v = _vals(s)
    idx = [l * 4 + h for l, h in heads]
    rest = [i for i in range(12) if i not in idx]
    assert res["auroc"] == pytest.approx(_naive_auroc(v[idx], v[rest]))
    null = np.array([_naive_auroc(v[list(c)], v[[i for i in range(12) if i not in c]])
                     for c in itertools.combinations(range(12), 4)])
    assert res["n_permutations"] == comb(12, 4) == len(null) and res["p_method"] == "exact, 495 labellings"
    assert res["p_value"] == pytest.approx((null >= res["auroc"] - 1e-9).mean())
    assert res["min_p"] == pytest.approx((null >= null.max() - 1e-9).mean())
    ref = stats.permutation_test((v[idx], v[rest]), lambda x, y: stats.mannwhitneyu(x, y).statistic / (len(x) * len(y)),
                                 vectorized=False, permutation_type="independent", n_resamples=np.inf,
                                 alternative="greater")
    assert res["p_value"] == pytest.approx(ref.pvalue)
    assert res["mean_score_in"] == pytest.approx(v[idx].mean()) and (res["n_in"], res["n_out"]) == (4, 8)


def test_circuit_rank_test_monte_carlo_agrees_with_exact_enumeration():
    s = _random_hs(11, shape=(5, 6))  # 30 heads, circuit of 5: C(30, 5) = 142,506 > 50,000
    v = _vals(s)
    order = np.argsort(-v)
    heads = [(int(i) // 6, int(i) % 6) for i in order[[2, 6, 9, 14, 20]]]  # middling heads: a moderate p
    res = overlap.circuit_rank_test(s, heads)
    ranks = stats.rankdata(v)
    combos = np.array(list(itertools.combinations(range(30), 5)))
    null = (ranks[combos].sum(1) - 15) / (5 * 25)  # AUROC = (rank sum - k(k+1)/2) / (k m), no ties
    exact = (null >= res["auroc"] - 1e-9).mean()
    assert res["auroc"] == pytest.approx(_naive_auroc(v[[l * 6 + h for l, h in heads]],
                                                      v[[i for i in range(30) if (i // 6, i % 6) not in heads]]))
    assert 0.02 < exact < 0.5
    assert res["exact"] is False and res["p_method"] == "Monte Carlo, 20,000 labellings, +1 correction"
    assert abs(res["p_value"] - exact) < 4 * np.sqrt(exact * (1 - exact) / 20_000)


def test_circuit_rank_test_edge_cases():
    s = _random_hs(3)
    assert overlap.circuit_rank_test(s, [])["auroc"] is None
    everything = overlap.circuit_rank_test(s, [(l, h) for l in range(6) for h in range(8)])
    assert everything["p_value"] is None and everything.p_value is None and everything.n_out == 0
    # the JSON keeps the keys of the dicts these results replaced (the p fields first): the note only when
    # undefined, the means only when defined (summary.json readers rely on them)
    base = ["p_value", "p_method", "exact", "n_permutations", "min_p"]
    assert list(everything.to_dict()) == [*base, "auroc", "alternative", "n", "n_in", "n_out", "note"]
    defined = overlap.circuit_rank_test(s, [(0, 0)])
    assert list(defined) == [*base, "auroc", "alternative", "n", "n_in", "n_out", "mean_score_in", "mean_score_out"]
    assert defined.mean_score_in == pytest.approx(float(s.scores[0, 0]))
    assert defined.mean_score_out == pytest.approx((float(s.scores.sum()) - float(s.scores[0, 0])) / 47)
    rho = overlap.rank_correlation(s, _random_hs(4))
    assert list(rho) == [*base, "rho", "n", "heads", "permutations", "alternative"] and "note" not in rho
    with pytest.raises(dataclasses.FrozenInstanceError):
        rho.rho = 1.0  # results are frozen
    with pytest.raises(ValueError, match="outside the 6x8"):
        overlap.circuit_rank_test(s, [(6, 0)])


# --- empirical p -----------------------------------------------------------------------------------


def test_empirical_p_hand_computed():
    draws = [0.1, 0.2, 0.5, 0.9]
    low = overlap.empirical_p(0.2, draws, alternative="less")  # 0.1 and 0.2 are at least as low
    assert low.p_value == pytest.approx(3 / 5) and float(low) == low.p_value
    assert overlap.empirical_p(0.2, draws, alternative="greater").p_value == pytest.approx(4 / 5)
    assert overlap.empirical_p(-1.0, draws, alternative="less").p_value == pytest.approx(1 / 5)
    assert low.min_p == pytest.approx(1 / 5) and low.how == "empirical, 4 random draws, +1 correction"
    thirty = overlap.empirical_p(0.0, np.ones(30), alternative="less")
    assert thirty.p_value == thirty.min_p == pytest.approx(1 / 31)
    with pytest.raises(ValueError, match="alternative"):
        overlap.empirical_p(0.2, draws, alternative="two-sided")
    with pytest.raises(ValueError, match="NaN"):
        overlap.empirical_p(0.2, [0.1, float("nan")], alternative="less")


# --- test tables -----------------------------------------------------------------------------------


def _row(p, min_p=1e-6, name="t"):
    return overlap.TestRow(name, "x", 1.0, p, "exact", 10, min_p)


def test_holm_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert overlap.adjust_p_values(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert overlap.adjust_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert overlap.adjust_p_values([0.3, 0.5]) == pytest.approx([0.6, 0.6])
    table = overlap.test_table([_row(q, name=f"t{i}") for i, q in enumerate(p)])
    assert table.adjusted_p == pytest.approx((0.03, 0.06, 0.06, 0.02))
    assert table.significant == (True, False, False, True)
    with pytest.raises(ValueError, match="holm"):
        overlap.adjust_p_values(p, "fdr")


def test_holm_agrees_with_the_step_down_procedure():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 12))
        p = rng.choice([0.001, 0.004, 0.01, 0.02, 0.03, 0.2], size=m) * rng.uniform(0.5, 1.5, m)
        # Holm 1979: reject p_(1), p_(2), ... while p_(j) <= alpha / (m - j + 1); stop at the first failure
        rejected = set()
        for j, i in enumerate(np.argsort(p, kind="stable")):
            if p[i] > 0.05 / (m - j):
                break
            rejected.add(int(i))
        table = overlap.test_table([_row(float(q)) for q in p])
        assert {i for i, s in enumerate(table.significant) if s} == rejected


def test_can_reach_depends_on_n_and_on_the_table():
    ablation = _row(1 / 31, min_p=1 / 31, name="ablation, 30 random sets")
    weak = [_row(0.5) for _ in range(17)]
    assert overlap.test_table([ablation, *weak]).can_reach[0] is False  # 18 / 31 > 0.05
    strong = [_row(1e-6) for _ in range(17)]
    table = overlap.test_table([ablation, *strong])  # the others pass first: its Holm bar relaxes to 0.05
    assert table.can_reach[0] is True and table.significant[0] is True
    assert overlap.test_table([ablation, *strong], correction="bonferroni").can_reach[0] is False


def test_table_json_markdown_and_errors():
    rho = overlap.rank_correlation(_hs(np.arange(6.0)[None]), _hs(np.array([[0, 2, 1, 3, 5, 4.0]])))
    rows = [overlap.TestRow.from_result("a | b: rho", rho, statistic="rho"),
            overlap.TestRow.from_result("ablation", overlap.empirical_p(0.1, [0.5] * 30, alternative="less"),
                                        statistic="normalised LD")]
    table = overlap.test_table(rows)
    data = json.loads(table.to_json())
    assert data["n_tests"] == 2 and data["correction"] == "holm"
    assert data["rows"][1]["n"] == 30 and data["rows"][1]["min_p"] == pytest.approx(1 / 31)
    md = table.to_markdown().splitlines()
    assert len(md) == 2 + 2 + 2 and "a \\| b: rho" in md[2] and "exact, 720 permutations" in md[2]
    with pytest.raises(ValueError, match="no p-value"):
        overlap.TestRow.from_result("constant", overlap.rank_correlation(_hs(torch.zeros(1, 6)), _hs(np.arange(6.0)[None])),
                                    statistic="rho")
    with pytest.raises(ValueError, match="smallest attainable"):
        overlap.test_table([_row(0.001, min_p=2 / 720)])
    with pytest.raises(ValueError, match="alpha"):
        overlap.test_table([_row(0.01)], alpha=5)


# --- top-k and compare -----------------------------------------------------------------------------


def test_topk_curve_against_naive_sets():
    a, b = _random_hs(0), _random_hs(1)
    curve = overlap.topk_overlap_curve(a, b)
    n = 48
    assert curve["k"] == list(range(1, n + 1))
    for k, obs in zip(curve["k"], curve["observed"]):
        assert obs == len(set(a.top(k)) & set(b.top(k)))  # no ties in continuous scores: same sets
    same = overlap.topk_overlap_curve(a, a, ks=[1, 5, 10])
    assert same["observed"] == [1, 5, 10]
    assert same["p_value"][-1] == pytest.approx(1 / comb(48, 10))  # only one 10-set of 48 is a's top 10
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
    a, b = _random_hs(0, shape=(3, 8), target="x"), _random_hs(1, shape=(3, 8), target="y")
    res = overlap.compare(a, b)
    assert isinstance(res, overlap.Comparison) and res.kind == "scores_vs_scores"
    assert res.top_k == 3 and res["set"]["size_a"] == 3  # 24 heads / 16, at least 3
    assert res["rank"]["rho"] == pytest.approx(stats.spearmanr(_vals(a), _vals(b)).statistic, abs=1e-9)
    assert res.rank_within_layers["permutations"] == "within layers"
    assert json.loads(res.to_json()) == json.loads(json.dumps(res.to_dict()))
    assert set(res.to_dict()) == {"kind", "a", "b", "set", "top_k", "rank", "rank_within_layers", "topk_curve"}

    circuit = Circuit.of(a.top(4), "ioi", "test")  # a's own top heads
    sv = overlap.compare(a, circuit)
    assert sv["kind"] == "scores_vs_set" and sv["top_k"] == 4 and sv["set"]["jaccard"] == 1.0
    # exactly one of the C(24, 4) = 10,626 choices of 4 heads has AUROC 1 (no ties): p = 1 / 10,626, exact
    assert sv["rank_test"]["auroc"] == 1.0 and sv["rank_test"]["p_value"] == pytest.approx(1 / comb(24, 4))
    assert sv["rank_test"]["p_method"] == "exact, 10,626 labellings"
    assert overlap.compare(circuit, a)["set"]["p_value"] == pytest.approx(1 / comb(24, 4))
    assert "rank" not in sv.to_dict() and sv.rank is None
    json.loads(sv.to_json())

    ss = overlap.compare(circuit, [(0, 0)], n_total=24)
    assert ss["kind"] == "set_vs_set" and set(ss.to_dict()) == {"kind", "a", "b", "set"}
    with pytest.raises(KeyError):
        ss["rank"]
    with pytest.raises(ValueError, match="n_total"):
        overlap.compare(circuit, [(0, 0)])
    with pytest.raises(ValueError, match="different heads"):
        overlap.compare(a, _random_hs(2, shape=(6, 8)))


def test_circuit_rank_test_within_a_subset_matches_brute_force():
    import itertools

    g = np.random.default_rng(5)
    s = HeadScores(torch.tensor(g.random((3, 8)), dtype=torch.float32), "m", "t", "test")
    among = [(0, 0), (0, 1), (0, 2), (0, 4), (0, 5), (1, 6)]
    circuit = [(0, 0), (0, 5)]
    res = overlap.circuit_rank_test(s, circuit, heads=among)
    vals = np.array([float(s.scores[l, h]) for l, h in among])

    def auroc(inside):
        a = [vals[i] for i in inside]
        b = [vals[i] for i in range(len(vals)) if i not in inside]
        return np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])

    obs = auroc([0, 4])
    null = [auroc(list(c)) for c in itertools.combinations(range(6), 2)]
    assert res["auroc"] == pytest.approx(obs)
    assert res["p_value"] == pytest.approx(np.mean([v >= obs - 1e-9 for v in null]))
    assert res["n"] == 6 and res["min_p"] == pytest.approx(1 / 15)
    with pytest.raises(ValueError, match="not among the heads compared"):
        overlap.circuit_rank_test(s, [(2, 2)], heads=among)


def test_binomial_p_is_the_sum_of_binomial_terms():
    """One-sided exact binomial p written out by hand: P(X >= k) for X ~ Bin(n, 1/2)."""
    from math import comb

    from circuitlib.overlap import binomial_p

    for k, n in [(10, 10), (7, 10), (5, 10), (0, 4)]:
        by_hand = sum(comb(n, i) for i in range(k, n + 1)) / 2**n
        r = binomial_p(k, n)
        assert r.p_value == pytest.approx(by_hand, rel=1e-12) and r.min_p == pytest.approx(0.5**n)
    with pytest.raises(ValueError, match="successes <= trials"):
        binomial_p(11, 10)
