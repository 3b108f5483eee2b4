"""Checks for the exercises of notebook 04 (overlap and reuse).

- :func:`check_exact_spearman`: Spearman's rho with an exact two-sided permutation p over a few heads (at most
  8: n! orderings, every one enumerated, as :func:`circuitlib.overlap.rank_correlation` does up to
  ``MAX_EXACT``), against ``rank_correlation(heads=...)`` on those heads;
- :func:`check_holm`: Holm's step-down adjustment, against :func:`circuitlib.overlap.adjust_p_values`;
- :func:`check_can_reach`: which tests of a Holm-corrected family could be significant at all,
  against :attr:`circuitlib.overlap.TestTable.can_reach`.

Every check prints one line (✓ / ✗ with what is wrong and a hint / not done yet) and never raises
(:func:`circuitlib.workshop.run_check`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..overlap import MAX_EXACT, TestTable, adjust_p_values, rank_correlation
from ..types import Head, HeadScores, head_name
from . import CheckResult, close, run_check

# ---------------------------------------------------------------------------------------------
# Exercise 1: an exact permutation test for Spearman's rho


def live_values(scores: HeadScores, live: Sequence[Head], absolute: bool = False) -> np.ndarray:
    """The scores of the ``live`` heads, in the order given (absolute values with ``absolute``)."""
    v = np.array([float(scores.scores[l, h]) for l, h in live])
    return np.abs(v) if absolute else v


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):  # ties share the mean of their ranks
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def _variants(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Values a plausible mistake would give, to say which mistake was made."""
    n = len(x)
    rx, ry = _average_ranks(x), _average_ranks(y)
    rho = _pearson(rx, ry)
    null = np.array([_pearson(rx, ry[list(p)]) for p in itertools.permutations(range(n))])
    tol = 1e-9 * max(1.0, abs(rho))
    two = int((np.abs(null) >= abs(rho) - tol).sum())
    ordinal = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable") + 1.0  # noqa: E731
    d = rx - ry
    return {
        "pearson": _pearson(x, y),
        "ordinal": _pearson(ordinal(x), ordinal(y)),
        "formula": 1 - 6 * float(d @ d) / (n * (n * n - 1)),
        "one_sided": int((null >= rho - tol).sum()) / len(null),
        "plus_one": (1 + two) / (1 + len(null)),
        "count": len(null),
    }


def _pair(result: Any) -> tuple[float, float]:
    if isinstance(result, Mapping):
        return float(result["rho"]), float(result["p_value"])
    rho, p = result
    return float(rho), float(p)


def check_exact_spearman(
    fn: Callable[[np.ndarray, np.ndarray], tuple[float, float]],
    comparisons: Mapping[str, tuple[HeadScores, HeadScores, bool]],
    live: Sequence[Head],
) -> CheckResult:
    """``fn(x, y) -> (rho, p)`` on the scores of the heads ``live`` for every comparison (``name -> (a, b,
    absolute)``), against ``rank_correlation(a, b, heads=live, absolute=absolute)``.

    ``live`` must be small enough to enumerate: at most ``MAX_EXACT`` = 50,000 orderings (8 heads), where the
    library's p is exact too; beyond, it is Monte Carlo and no enumeration can match it (``ValueError``).
    """
    n_perm = math.factorial(len(live))
    if n_perm > MAX_EXACT:
        raise ValueError(f"{len(live)} heads have {n_perm:,} orderings, more than the {MAX_EXACT:,} that "
                         "circuitlib.overlap.rank_correlation enumerates (beyond, its p is Monte Carlo and no exact "
                         "enumeration matches it): pass at most 8 heads, e.g. the live heads of one layer")

    def attempt():
        return {name: fn(live_values(a, live, ab), live_values(b, live, ab))
                for name, (a, b, ab) in comparisons.items()}

    def verify(got: dict) -> str | None:
        for name, (a, b, ab) in comparisons.items():
            want = rank_correlation(a, b, heads=live, absolute=ab)
            try:
                rho, p = _pair(got[name])
            except (TypeError, ValueError, KeyError):
                return f"{name}: return a pair (rho, p) of two numbers; got {got[name]!r}."
            var = _variants(live_values(a, live, ab), live_values(b, live, ab))
            if not close(rho, want["rho"], 1e-6):
                why = (" That is Pearson's r of the raw scores: rank both vectors first." if close(rho, var["pearson"], 1e-6)
                       else " That is what ordinal ranks give: tied scores must share the average of their ranks "
                            "(scipy.stats.rankdata's default)." if close(rho, var["ordinal"], 1e-6)
                       else " That is the 1 - 6 sum(d^2) / (n(n^2 - 1)) shortcut, exact only without ties: take "
                            "Pearson's r of the average ranks." if close(rho, var["formula"], 1e-6) else "")
                return f"{name}: rho = {rho:.4f}, expected {want['rho']:.4f}.{why}"
            if not close(p, want["p_value"], 1e-9):
                why = (" That is a one-sided p (rho_perm >= rho): count |rho_perm| >= |rho| for a two-sided test."
                       if close(p, var["one_sided"], 1e-9)
                       else f" That is (1 + count) / (1 + {n_perm}): with exact enumeration the observed ordering is "
                            f"already one of the {n_perm} permutations, so p = count / {n_perm}."
                       if close(p, var["plus_one"], 1e-9)
                       else " Your count misses orderings as extreme as the observed one: count |rho_perm| >= "
                            "|rho| - 1e-9 (>=, not >, and with a tolerance: orderings that tie with the observed |rho| "
                            "up to float rounding count too, the observed ordering itself included)."
                       if p < want["p_value"] else
                       f" Enumerate all {n_perm} = {len(live)}! orderings of one score vector (itertools.permutations) "
                       "and count those with |rho_perm| >= |rho|, the identity included.")
                return f"{name}: p = {p:.5g}, expected {want['p_value']:.5g} = {round(want['p_value'] * n_perm)}/{n_perm}.{why}"
        return None

    names = ", ".join(comparisons)
    return run_check("exact Spearman test", attempt, verify,
                     success=f"rho and the exact two-sided p match circuitlib.overlap.rank_correlation on the "
                             f"{len(live)} heads given, {len(comparisons)} comparisons ({names}; {n_perm:,} "
                             "permutations each).",
                     hint="ranks with scipy.stats.rankdata (average ranks for ties); rho = Pearson's r of the ranks; "
                          "p = #{permutations with |rho_perm| >= |rho| - 1e-9} / n!.")


# ---------------------------------------------------------------------------------------------
# Exercise 2: Holm's correction

#: A small family where every mistake shows: the two largest p need the clip at 1 and the running
#: maximum, and the input is not sorted.
HOLM_EXAMPLE = (0.04, 0.01, 0.03, 0.6, 0.012, 0.55)


def _holm_variants(p: Sequence[float]) -> dict[str, list[float]]:
    v = np.asarray(p, dtype=float)
    m = v.size
    order = np.argsort(v, kind="stable")
    steps = (m - np.arange(m)) * v[order]
    def unsorted(s):
        return _unsort(s, order)

    return {
        "bonferroni": np.minimum(1.0, m * v).tolist(),
        "no_max": unsorted(np.minimum(1.0, steps)),
        "no_clip": unsorted(np.maximum.accumulate(steps)),
        "sorted": np.maximum.accumulate(np.minimum(1.0, steps)).tolist(),
        "ascending_multiplier": unsorted(np.maximum.accumulate(np.minimum(1.0, (np.arange(m) + 1) * v[order]))),
    }


def _unsort(sorted_values: np.ndarray, order: np.ndarray) -> list[float]:
    out = np.empty(len(order))
    out[order] = sorted_values
    return out.tolist()


def _same(got: Any, want: Sequence[float]) -> bool:
    try:
        values = [float(g) for g in got]
    except (TypeError, ValueError):
        return False
    return len(values) == len(want) and all(close(g, w, 1e-9) for g, w in zip(values, want))


def check_holm(fn: Callable[[Sequence[float]], Sequence[float]], p_values: Sequence[float]) -> CheckResult:
    """``fn(p) -> adjusted p`` (input order) on ``p_values`` (e.g. the notebook's family) and on
    :data:`HOLM_EXAMPLE`, against ``adjust_p_values(p, "holm")``."""
    cases = {"the family's p-values": list(p_values), f"the example {list(HOLM_EXAMPLE)}": list(HOLM_EXAMPLE)}

    def attempt():
        return {name: fn(list(p)) for name, p in cases.items()}

    def verify(got: dict) -> str | None:
        for name, p in cases.items():
            want = adjust_p_values(p, "holm")
            if _same(got[name], want):
                continue
            var = _holm_variants(p)
            shown = ", ".join(f"{float(g):.4g}" for g in got[name]) if _is_list(got[name]) else repr(got[name])
            if not _is_list(got[name]) or len(got[name]) != len(p):
                return f"on {name}: return one adjusted p per input p ({len(p)} numbers, in the input order); got {shown}."
            why = {
                "bonferroni": "that is Bonferroni (every p times m): Holm multiplies the i-th smallest p by m - i + 1 "
                              "(m, m - 1, ..., 1).",
                "no_max": "the adjusted values must not decrease along the sorted p-values: take the running maximum "
                          "(numpy.maximum.accumulate) of (m - i + 1) p_(i).",
                "no_clip": "an adjusted p is a probability: clip it at 1 (before the running maximum).",
                "sorted": "these are the adjusted values in sorted order: put each back at its p's position in the input.",
                "ascending_multiplier": "the smallest p gets the largest multiplier (m), the largest p the smallest (1).",
            }
            reason = next((text for key, text in why.items() if _same(got[name], var[key])), "")
            return (f"on {name}: got [{shown}], expected [{', '.join(f'{w:.4g}' for w in want)}]. "
                    + (reason or "Sort ascending, multiply the i-th smallest by m - i + 1, clip at 1, running maximum, "
                                 "then restore the input order."))
        return None

    return run_check("Holm's correction", attempt, verify,
                     success=f"matches circuitlib.overlap.adjust_p_values(p, 'holm') on the family's {len(p_values)} "
                             f"p-values and on a {len(HOLM_EXAMPLE)}-test example.",
                     hint="order = numpy.argsort(p); steps = (m - arange(m)) * p[order]; clip, running max, unsort.")


def _is_list(x: Any) -> bool:
    try:
        [float(g) for g in x]
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Exercise 3: can a test reach the corrected bar at all?

#: rows (p, smallest attainable p) where the mistakes differ from the right answer
CAN_REACH_EXAMPLE = ((0.01, 0.002), (0.5, 0.02), (0.002, 0.002), (0.1, 0.03), (0.01, 0.001))


def _can_reach_variants(p: Sequence[float], min_p: Sequence[float], alpha: float) -> dict[str, list[bool]]:
    m = len(p)
    tol = 1e-12
    return {
        "uncorrected": [mp <= alpha + tol for mp in min_p],
        "bonferroni": [mp * m <= alpha + tol for mp in min_p],
        "all_at_min": [a <= alpha + tol for a in adjust_p_values(list(min_p), "holm")],
        "observed": [a <= alpha + tol for a in adjust_p_values(list(p), "holm")],
    }


def check_can_reach(fn: Callable[[Sequence[float], Sequence[float], float], Sequence[bool]],
                    table: TestTable) -> CheckResult:
    """``fn(p, min_p, alpha) -> [bool]`` on ``table``'s rows and on :data:`CAN_REACH_EXAMPLE`, against
    :attr:`TestTable.can_reach` (Holm)."""
    from ..overlap import TestRow, test_table

    example = test_table([TestRow(f"t{i}", "x", None, p, "given", 1, mp) for i, (p, mp) in enumerate(CAN_REACH_EXAMPLE)],
                         alpha=table.alpha)
    cases = {"the family": table, "the example": example}

    def attempt():
        return {name: fn([r.p for r in t.rows], [r.min_p for r in t.rows], t.alpha) for name, t in cases.items()}

    def verify(got: dict) -> str | None:
        for name, t in cases.items():
            want = list(t.can_reach)
            g = got[name]
            try:
                values = [bool(x) for x in g]
            except TypeError:
                return f"on {name}: return one True / False per row; got {g!r}."
            if values == want:
                continue
            if len(values) != len(want):
                return f"on {name}: return one True / False per row ({len(want)}); got {len(values)}."
            p, mp = [r.p for r in t.rows], [r.min_p for r in t.rows]
            var = _can_reach_variants(p, mp, t.alpha)
            why = {
                "all_at_min": "you put every row at its smallest p at once: change only the row in question and keep "
                              "the other rows' observed p-values.",
                "uncorrected": "you compared each smallest p with alpha itself: the bar is the corrected one (Holm).",
                "bonferroni": "you used Bonferroni (m * min_p <= alpha): the family is Holm-corrected, where a row's "
                              "multiplier depends on where its p falls among the others.",
                "observed": "that is which rows ARE significant: ask whether each row WOULD be if its p were its "
                            "smallest attainable p.",
            }
            reason = next((text for key, text in why.items() if var[key] == values), "")
            fmt = lambda xs: "[" + ", ".join("yes" if x else "no" for x in xs) + "]"  # noqa: E731
            return (f"on {name}: got {fmt(values)}, expected {fmt(want)}. "
                    + (reason or "For row i: copy p, set p[i] = min_p[i], Holm-adjust, compare entry i with alpha."))
        return None

    return run_check("can a test reach the bar?", attempt, verify,
                     success=f"matches TestTable.can_reach on the family's {len(table.rows)} rows and on a "
                             f"{len(CAN_REACH_EXAMPLE)}-row example.",
                     hint="use circuitlib.overlap.adjust_p_values(best, 'holm')[i] <= alpha, with best = p but "
                          "best[i] = min_p[i].")


__all__ = ["CAN_REACH_EXAMPLE", "HOLM_EXAMPLE", "check_can_reach", "check_exact_spearman", "check_holm", "live_values"]
