"""Are two head scorings / head sets related more than chance? Set and rank statistics with p-values.

Works on any two of: :class:`HeadScores` (a score per head), :class:`Circuit`, or a plain set of
``(layer, head)`` / ``"L.H"``. Every function returns a JSON-able dict.

Conventions (they change numbers):

- Top-k of a scoring breaks ties **at random with a fixed seed**, independently per scoring, so
  that blocks of tied scores (e.g. many heads at 0) cannot create overlap through index order.
- Set overlap p-value: hypergeometric ``P(X >= |a & b|)``, drawing ``|b|`` heads out of ``n_total``
  of which ``|a|`` are in ``a`` (one-sided: "more overlap than chance").
- Empty sets are allowed and give Jaccard 0, overlap coefficient 0, p-value 1 (no evidence).
- Spearman's rho with average ranks for ties; p-value from label permutations (two-sided,
  ``(1 + #{|rho_perm| >= |rho|}) / (1 + n_permutations)``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy import stats

from .types import Circuit, Head, HeadScores, TaskBatch, head_name, parse_head

HeadSet = Circuit | Iterable[Head | str]


def as_head_set(heads: HeadSet) -> frozenset[Head]:
    """A frozenset of ``(layer, head)`` from a Circuit, tuples or ``"L.H"`` strings."""
    if isinstance(heads, HeadScores):
        raise ValueError("got HeadScores where a head set was expected: take its top-k (scores.top(k)) or use compare()")
    if isinstance(heads, Circuit):
        return heads.heads
    return frozenset(parse_head(h) if isinstance(h, str) else (int(h[0]), int(h[1])) for h in heads)


def set_overlap(a: HeadSet, b: HeadSet, n_total: int) -> dict[str, Any]:
    """Intersection, Jaccard, overlap coefficient and hypergeometric p-value of two head sets.

    ``n_total`` = number of heads the sets were drawn from (``n_layers * n_heads``). ``expected``
    is the mean intersection size for random sets of the same sizes, ``|a| |b| / n_total``.
    """
    sa, sb = as_head_set(a), as_head_set(b)
    union = sa | sb
    if len(union) > n_total:
        raise ValueError(
            f"the two sets hold {len(union)} distinct heads but n_total is {n_total}: pass the model's "
            "head count (n_layers * n_heads)"
        )
    inter = sa & sb
    smaller = min(len(sa), len(sb))
    return {
        "intersection": [head_name(h) for h in sorted(inter)],
        "size_a": len(sa),
        "size_b": len(sb),
        "size_intersection": len(inter),
        "n_total": int(n_total),
        "jaccard": len(inter) / len(union) if union else 0.0,
        "overlap_coefficient": len(inter) / smaller if smaller else 0.0,
        "expected": len(sa) * len(sb) / n_total,
        "p_value": hypergeom_p(len(inter), n_total, len(sa), len(sb)),
    }


def hypergeom_p(observed: int, n_total: int, size_a: int, size_b: int) -> float:
    """``P(X >= observed)`` for ``X`` ~ Hypergeometric(population ``n_total``, ``size_a`` successes,
    ``size_b`` draws): the chance of at least this much overlap between random sets."""
    return float(min(1.0, stats.hypergeom.sf(observed - 1, n_total, size_a, size_b)))


def _flat_scores(x: HeadScores, absolute: bool = False) -> np.ndarray:
    values = x.scores.abs() if absolute else x.scores
    return values.flatten().double().numpy()


def _check_same_grid(a: HeadScores, b: HeadScores) -> None:
    if a.scores.shape != b.scores.shape:
        raise ValueError(
            f"the two scorings cover different heads ({tuple(a.scores.shape)} vs {tuple(b.scores.shape)}): "
            "compare scores of the same model"
        )


def rank_correlation(
    a: HeadScores,
    b: HeadScores,
    *,
    n_permutations: int = 10_000,
    seed: int = 0,
    absolute: bool = False,
    within_layers: bool = False,
) -> dict[str, Any]:
    """Spearman's rho between two scorings of the same heads, with a permutation p-value.

    All permutations are done at once (a ``[n_permutations, n_heads]`` matrix of permuted ranks).
    ``within_layers``: permute heads only within each layer, so the null keeps each layer's score
    distribution; a small p then means agreement beyond "both scorings favour the same layers".
    If either scoring is constant, rho is undefined: ``rho`` and ``p_value`` are ``None``.
    """
    _check_same_grid(a, b)
    ra = stats.rankdata(_flat_scores(a, absolute))
    rb = stats.rankdata(_flat_scores(b, absolute))
    n = ra.size
    if ra.std() == 0 or rb.std() == 0:
        return {"rho": None, "p_value": None, "n": n, "n_permutations": n_permutations,
                "note": "one scoring is constant: rank correlation undefined"}
    za = (ra - ra.mean()) / ra.std()
    zb = (rb - rb.mean()) / rb.std()
    rho = float(za @ zb / n)
    rng = np.random.default_rng(seed)
    if within_layers:  # rows of [layer, head]: shuffle heads inside each layer
        grid = np.broadcast_to(zb.reshape(a.n_layers, a.n_heads), (n_permutations, a.n_layers, a.n_heads))
        perms = rng.permuted(grid, axis=2).reshape(n_permutations, n)
    else:
        perms = rng.permuted(np.broadcast_to(zb, (n_permutations, n)), axis=1)
    null = perms @ za / n
    exceed = int((np.abs(null) >= abs(rho) - 1e-12).sum())
    return {
        "rho": rho,
        "p_value": (1 + exceed) / (1 + n_permutations),
        "n": n,
        "n_permutations": n_permutations,
        "permutations": "within layers" if within_layers else "all heads",
        "alternative": "two-sided",
    }


def top_set(x: HeadScores, k: int, *, seed: int = 0, absolute: bool = False) -> frozenset[Head]:
    """The ``k`` highest-scoring heads, ties broken at random (seeded) rather than by head index."""
    order = _ranking(x, seed=seed, absolute=absolute)
    return frozenset((int(i) // x.n_heads, int(i) % x.n_heads) for i in order[:k])


def _ranking(x: HeadScores, *, seed: int, absolute: bool) -> np.ndarray:
    values = _flat_scores(x, absolute)
    tiebreak = np.random.default_rng(seed).random(values.size)
    return np.lexsort((tiebreak, -values))  # best first


def topk_overlap_curve(
    a: HeadScores, b: HeadScores, ks: Sequence[int] | None = None, *, seed: int = 0, absolute: bool = False
) -> dict[str, Any]:
    """|top-k(a) & top-k(b)| for a sweep of k, with chance ``k^2 / N`` and a hypergeometric p per k.

    ``ks`` defaults to ``1 .. min(N, 50)``. Ties are broken at random (``seed``), independently for
    ``a`` and ``b`` (different streams).
    """
    _check_same_grid(a, b)
    n = a.scores.numel()
    ks = list(range(1, min(n, 50) + 1)) if ks is None else [int(k) for k in ks]
    if any(k < 1 or k > n for k in ks):
        raise ValueError(f"every k must be in 1..{n} (the number of heads); got {ks}")
    order_a = _ranking(a, seed=seed, absolute=absolute)
    order_b = _ranking(b, seed=seed + 1, absolute=absolute)
    pos_b = np.empty(n, dtype=int)
    pos_b[order_b] = np.arange(n)
    # head at rank i of a is in top-k of b iff pos_b < k; overlap(k) = #{i < k : pos_b[order_a[i]] < k}
    rank_b_of_a = pos_b[order_a]
    observed = [int((rank_b_of_a[:k] < k).sum()) for k in ks]
    return {
        "names": [_describe_short(a), _describe_short(b)],
        "k": ks,
        "observed": observed,
        "expected": [k * k / n for k in ks],
        "p_value": [hypergeom_p(o, n, k, k) for o, k in zip(observed, ks)],
        "n_total": n,
    }


def _describe_short(x: HeadScores) -> str:
    return f"{x.method}:{x.target}"


def _describe(x) -> dict[str, Any]:
    if isinstance(x, HeadScores):
        return {"type": "scores", "method": x.method, "target": x.target, "model": x.model, "k": x.k}
    if isinstance(x, Circuit):
        return {"type": "circuit", "task": x.task, "model": x.model, "how": x.how, "heads": x.names()}
    return {"type": "set", "heads": [head_name(h) for h in sorted(as_head_set(x))]}


def default_top_k(n_total: int) -> int:
    """Top-k used when none is given: 1/16 of the heads, at least 3 (toy: 3 of 24; gpt2-medium: 24 of 384)."""
    return max(3, round(n_total / 16))


def circuit_rank_test(scores: HeadScores, circuit: HeadSet, *, absolute: bool = False) -> dict[str, Any]:
    """Do circuit heads score higher than the other heads? AUROC and one-sided Mann-Whitney p.

    AUROC = probability that a random circuit head outscores a random non-circuit head (ties 1/2);
    0.5 = no relation. Needs at least one head inside and one outside the circuit.
    """
    heads = as_head_set(circuit)
    values = _flat_scores(scores, absolute)
    inside = np.zeros(values.size, dtype=bool)
    for l, h in heads:
        if not (0 <= l < scores.n_layers and 0 <= h < scores.n_heads):
            raise ValueError(f"circuit head {head_name((l, h))} is outside the {scores.n_layers}x{scores.n_heads} scores")
        inside[l * scores.n_heads + h] = True
    if inside.all() or not inside.any():
        return {"auroc": None, "p_value": None, "note": "need heads both inside and outside the circuit"}
    test = stats.mannwhitneyu(values[inside], values[~inside], alternative="greater")
    return {
        "auroc": float(test.statistic / (inside.sum() * (~inside).sum())),
        "p_value": float(test.pvalue),
        "mean_score_in": float(values[inside].mean()),
        "mean_score_out": float(values[~inside].mean()),
    }


def compare(
    a: HeadScores | HeadSet,
    b: HeadScores | HeadSet,
    *,
    top_k: int | None = None,
    n_total: int | None = None,
    n_permutations: int = 10_000,
    seed: int = 0,
    absolute: bool = False,
) -> dict[str, Any]:
    """Compare two head scorings or head sets with the statistics that fit their types.

    - scores vs scores: rank correlation (p-values from permutations over all heads and within
      layers), top-k overlap curve, set overlap of the two top-``top_k`` sets (default
      :func:`default_top_k`);
    - scores vs set (either order): set overlap of top-``|set|`` (or ``top_k``) with the set, and
      :func:`circuit_rank_test` (do the set's heads score higher?);
    - set vs set: :func:`set_overlap`; needs ``n_total`` unless a HeadScores fixes the grid.
    """
    out: dict[str, Any] = {"a": _describe(a), "b": _describe(b)}
    a_scores, b_scores = isinstance(a, HeadScores), isinstance(b, HeadScores)
    if a_scores and b_scores:
        _check_same_grid(a, b)
        n = a.scores.numel()
        k = top_k or default_top_k(n)
        out.update(
            kind="scores_vs_scores",
            rank=rank_correlation(a, b, n_permutations=n_permutations, seed=seed, absolute=absolute),
            rank_within_layers=rank_correlation(a, b, n_permutations=n_permutations, seed=seed,
                                                absolute=absolute, within_layers=True),
            topk_curve=topk_overlap_curve(a, b, seed=seed, absolute=absolute),
            top_k=k,
            set=set_overlap(top_set(a, k, seed=seed, absolute=absolute),
                            top_set(b, k, seed=seed + 1, absolute=absolute), n),
        )
        return out
    if a_scores or b_scores:
        scores, heads = (a, b) if a_scores else (b, a)
        heads = as_head_set(heads)
        n = scores.scores.numel()
        k = top_k or len(heads) or default_top_k(n)
        top = top_set(scores, k, seed=seed, absolute=absolute)
        sets = (top, heads) if a_scores else (heads, top)
        out.update(kind="scores_vs_set", top_k=k, set=set_overlap(*sets, n),
                   rank_test=circuit_rank_test(scores, heads, absolute=absolute))
        return out
    if n_total is None:
        raise ValueError("comparing two head sets needs n_total (the model's n_layers * n_heads)")
    out.update(kind="set_vs_set", set=set_overlap(a, b, n_total))
    return out


