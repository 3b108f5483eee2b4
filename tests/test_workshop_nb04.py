"""Notebook 04's exercise checks: correct for the solution, wrong (with the message that says why) for
plausible mistakes, not done for a stub; never raising."""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import rankdata

from circuitlib import overlap, workshop
from circuitlib.overlap import TestRow, test_table
from circuitlib.types import HeadScores
from circuitlib.workshop import nb04

# score maps on a 2 x 4 grid; the "live" heads are six of them. MAPS-like maps with a tie (as on the
# embedded model), a patching-like map with a negative entry.
LIVE = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2)]


def _scores(values_on_live, name):
    grid = np.zeros((2, 4))
    for (l, h), v in zip(LIVE, values_on_live):
        grid[l, h] = v
    grid[1, 1], grid[1, 3] = 0.003, 0.07  # "dead" heads: not compared
    return HeadScores(grid, "test", name, "test")


COPY = _scores([1.0, 0.622, 0.423, 0.006, 0.878, 0.0], "copy")
CAPITAL = _scores([1.0, 0.765, 0.378, 0.0, 0.975, 0.0], "capital")
PATCH = _scores([0.124, -0.003, 0.006, 0.001, 0.002, 1.04], "patch")
COMPARISONS = {"maps vs maps": (COPY, CAPITAL, False), "|patch| vs maps": (PATCH, COPY, True),
               "maps vs patch": (CAPITAL, PATCH, False)}


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def exact_spearman(x, y):  # the notebook's solution
    rx, ry = rankdata(x), rankdata(y)
    observed = _pearson(rx, ry)
    at_least = total = 0
    for order in itertools.permutations(range(len(ry))):
        total += 1
        at_least += abs(_pearson(rx, ry[list(order)])) >= abs(observed) - 1e-9
    return observed, at_least / total


def _spearman_with(rank=rankdata, extreme=lambda r, o: abs(r) >= abs(o) - 1e-9, plus_one=False, raw=False):
    def fn(x, y):
        rx, ry = (np.asarray(x, float), np.asarray(y, float)) if raw else (rank(x), rank(y))
        observed = _pearson(rx, ry)
        hits = total = 0
        for order in itertools.permutations(range(len(ry))):
            total += 1
            hits += extreme(_pearson(rx, ry[list(order)]), observed)
        return observed, ((1 + hits) / (1 + total) if plus_one else hits / total)
    return fn


def _stub(*args, **kwargs):
    raise NotImplementedError("your code here")


def test_exact_spearman_matches_the_library_for_the_solution(capsys):
    r = nb04.check_exact_spearman(exact_spearman, COMPARISONS, LIVE)
    assert r.status == "correct" and "✓" in capsys.readouterr().out
    # what the check compares with: the library on the live heads only
    want = overlap.rank_correlation(COPY, CAPITAL, heads=LIVE)
    assert exact_spearman(nb04.live_values(COPY, LIVE), nb04.live_values(CAPITAL, LIVE)) == pytest.approx(
        (want["rho"], want["p_value"]))
    assert want["p_value"] == pytest.approx(4 / 720)


@pytest.mark.parametrize("fn, message", [
    (_spearman_with(raw=True), "Pearson's r of the raw scores"),
    (_spearman_with(rank=lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable") + 1.0), "average of their ranks"),
    (_spearman_with(extreme=lambda r, o: r >= o - 1e-9), "one-sided"),
    (_spearman_with(plus_one=True), "(1 + count) / (1 + 720)"),
    (_spearman_with(extreme=lambda r, o: abs(r) > abs(o) + 1e-9), ">=, not >"),
    (lambda x, y: exact_spearman(x, y)[0], "return a pair (rho, p)"),
])
def test_exact_spearman_says_what_is_wrong(fn, message):
    r = nb04.check_exact_spearman(fn, COMPARISONS, LIVE)
    assert r.status == "wrong" and message in r.message, r.message


def test_exact_spearman_rank_formula_with_ties_is_named():
    def formula(x, y):
        rx, ry = rankdata(x), rankdata(y)
        n = len(rx)
        rho = 1 - 6 * float((rx - ry) @ (rx - ry)) / (n * (n * n - 1))
        return rho, exact_spearman(x, y)[1]

    r = nb04.check_exact_spearman(formula, {"maps vs maps": COMPARISONS["maps vs maps"]}, LIVE)
    assert r.status == "wrong" and "shortcut, exact only without ties" in r.message


def test_exact_spearman_not_done_and_crash(capsys):
    assert nb04.check_exact_spearman(_stub, COMPARISONS, LIVE).status == "not done"
    assert workshop.NOT_DONE in capsys.readouterr().out
    r = nb04.check_exact_spearman(lambda x, y: 1 / 0, COMPARISONS, LIVE)
    assert r.status == "wrong" and "ZeroDivisionError" in r.message


def test_exact_spearman_refuses_heads_too_many_to_enumerate():
    many = [(l, h) for l in range(2) for h in range(4)] + [(2, 0)]  # 9 heads: 9! = 362,880 > MAX_EXACT
    scores = HeadScores(np.arange(12.0).reshape(3, 4), "test", "x", "test")
    with pytest.raises(ValueError, match="at most 8 heads"):
        nb04.check_exact_spearman(exact_spearman, {"x": (scores, scores, False)}, many)
    assert math.factorial(8) <= overlap.MAX_EXACT < math.factorial(9)


def holm(p):  # the notebook's solution
    p = np.asarray(p, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


FAMILY_P = [1.0, 0.5639, 4 / 720, 0.05, 0.8028, 1.0, 20 / 720, 1 / 2024]


def test_holm_correct(capsys):
    assert nb04.check_holm(holm, FAMILY_P).status == "correct"
    assert "✓" in capsys.readouterr().out
    assert holm(nb04.HOLM_EXAMPLE) == pytest.approx(overlap.adjust_p_values(list(nb04.HOLM_EXAMPLE)))


def _sorted_order(p):
    return sorted(holm(p))


def _no_max(p):
    p = np.asarray(p, float)
    m, order = p.size, np.argsort(p, kind="stable")
    out = np.empty(m)
    out[order] = np.minimum(1.0, (m - np.arange(m)) * p[order])
    return out.tolist()


def _no_clip(p):
    p = np.asarray(p, float)
    m, order = p.size, np.argsort(p, kind="stable")
    out = np.empty(m)
    out[order] = np.maximum.accumulate((m - np.arange(m)) * p[order])
    return out.tolist()


@pytest.mark.parametrize("fn, message", [
    (lambda p: [min(1.0, len(p) * x) for x in p], "that is Bonferroni"),
    (_no_max, "running maximum"),
    (_no_clip, "clip it at 1"),
    (_sorted_order, "in sorted order"),
    (lambda p: 0.05, "one adjusted p per input p"),
])
def test_holm_says_what_is_wrong(fn, message):
    r = nb04.check_holm(fn, FAMILY_P)
    assert r.status == "wrong" and message in r.message, r.message


def test_holm_not_done():
    assert nb04.check_holm(_stub, FAMILY_P).status == "not done"


def _family():
    rows = [(1.0, 0.5), (0.5639, 2 / 720), (4 / 720, 4 / 720), (0.05, 0.05), (0.8028, 2 / 720), (1.0, 1 / 24),
            (20 / 720, 4 / 720), (1 / 2024, 1 / 2024)]
    return test_table([TestRow(f"t{i}", "x", None, p, "exact", 6, mp) for i, (p, mp) in enumerate(rows)])


def can_reach(p, min_p, alpha=0.05):  # the notebook's solution
    out = []
    for i in range(len(p)):
        best = list(p)
        best[i] = min_p[i]
        out.append(overlap.adjust_p_values(best, "holm")[i] <= alpha + 1e-12)
    return out


def test_can_reach_correct(capsys):
    table = _family()
    assert list(table.can_reach) == [False, True, True, False, True, False, True, True]
    assert nb04.check_can_reach(can_reach, table).status == "correct"
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("fn, message", [
    (lambda p, mp, a: [x <= a for x in mp], "compared each smallest p with alpha itself"),
    (lambda p, mp, a: [x * len(mp) <= a for x in mp], "you used Bonferroni"),
    (lambda p, mp, a: [x <= a for x in overlap.adjust_p_values(list(mp))], "every row at its smallest p at once"),
    (lambda p, mp, a: [x <= a for x in overlap.adjust_p_values(list(p))], "which rows ARE significant"),
    (lambda p, mp, a: [True], "one True / False per row"),
])
def test_can_reach_says_what_is_wrong(fn, message):
    r = nb04.check_can_reach(fn, _family())
    assert r.status == "wrong" and message in r.message, r.message


def test_can_reach_not_done():
    assert nb04.check_can_reach(_stub, _family()).status == "not done"
