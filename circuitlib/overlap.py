"""Are two head scorings / head sets related more than chance? Set and rank statistics with p-values.

Works on any two of: :class:`HeadScores` (a score per head), :class:`Circuit`, or a plain set of
``(layer, head)`` / ``"L.H"``. Every function returns a frozen dataclass with ``to_dict`` / ``to_json``:
:func:`set_overlap` a :class:`SetOverlap`, :func:`rank_correlation` a :class:`RankCorrelation`,
:func:`circuit_rank_test` a :class:`CircuitRankTest`, :func:`topk_overlap_curve` a
:class:`TopkOverlapCurve` (these four also read as mappings, ``r["p_value"]``, as the dicts they
replaced; the two rank tests share their p fields through :class:`PermutationStatistic`),
:func:`permutation_test` / :func:`empirical_p` a :class:`PValue`, :func:`compare` a :class:`Comparison`,
:func:`test_table` a :class:`TestTable`. Fields that do not apply (a ``note`` of a defined statistic)
are left out of ``to_dict()``.

Conventions (they change numbers):

- **Permutation p-values** all come from one engine, :func:`permutation_test`. If the null's
  relabellings number at most ``MAX_EXACT`` = 50,000 they are all enumerated and
  ``p = #{relabellings at least as extreme as the observed one} / count`` (the observed relabelling is
  one of them, so ``p >= 1 / count``). Otherwise ``n_permutations >= MIN_MONTE_CARLO`` = 20,000 seeded
  random relabellings are drawn and ``p = (1 + #{at least as extreme}) / (1 + n_permutations)``.
  "At least as extreme" allows a float tolerance of ``1e-9 * max(1, |observed|)``. Every result says
  how p was obtained (``"exact, 720 permutations"``, ``"Monte Carlo, 20,000 permutations, +1
  correction"``) and the **smallest p the test can attain** with these data: exact = the share of
  relabellings at the most extreme value of the statistic (``2/720`` for a two-sided Spearman test on 6
  untied heads, ``4/720`` with one tie), Monte Carlo = ``1 / (1 + n_permutations)``. No asymptotic
  formulas (scipy's ``spearmanr`` / ``mannwhitneyu`` p-values are not used).
- Spearman's rho with average ranks for ties, ranked among the heads compared (with ``heads=``, within
  that subset); two-sided p: ``|rho_perm| >= |rho|``; the null permutes one scoring over the heads
  (all heads, or only within each layer: ``prod_l n_l!`` relabellings).
- Circuit rank test: AUROC (ties count 1/2), one-sided ("circuit heads score higher"); the null makes
  every choice of ``k`` heads out of ``n`` equally likely (``C(n, k)`` labellings).
- Set overlap p-value: hypergeometric ``P(X >= |a & b|)``, drawing ``|b|`` heads out of ``n_total``
  of which ``|a|`` are in ``a`` (exact, one-sided: "more overlap than chance").
- Empty sets are allowed and give Jaccard 0, overlap coefficient 0, p-value 1 (no evidence).
- Top-k of a scoring breaks ties **at random with a fixed seed**, independently per scoring, so
  that blocks of tied scores (e.g. many heads at 0) cannot create overlap through index order.
- :func:`empirical_p` (observed value vs ``n`` random draws, e.g. random head sets):
  ``(1 + #{draws at least as extreme}) / (1 + n)``, never below ``1 / (1 + n)``.
- A family of tests is one :func:`test_table`, corrected over its rows (Holm by default, or
  Bonferroni); a row is significant when its adjusted p is ``<= alpha`` (float tolerance 1e-12, so a
  p exactly at the bar passes, as in Holm 1979 and statsmodels).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
from jaxtyping import Float, Int, Real
from scipy import stats

from .results import MappingResult, Result
from .types import Circuit, Head, HeadScores, head_name, parse_head

HeadSet = Circuit | Iterable[Head | str]

MAX_EXACT = 50_000
"""Enumerate every relabelling when there are at most this many."""
MIN_MONTE_CARLO = 20_000
"""Fewest random relabellings a Monte-Carlo p-value may use."""
_CHUNK = 4096  # relabellings per vectorised batch (bounds memory: 4096 x 384 heads = 12 MB)
_P_TOL = 1e-12  # p <= alpha comparisons


def _tolerance(value: float) -> float:
    return 1e-9 * max(1.0, abs(value))


# ---------------------------------------------------------------------------------------------------
# The permutation engine
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PValue(Result):
    """A p-value and how it was obtained.

    - ``statistic``: the observed value of the test statistic;
    - ``p_value``: the p-value;
    - ``alternative``: ``"two-sided"`` (``|T| >= |t|``), ``"greater"`` (``T >= t``) or ``"less"``;
    - ``method``: ``"exact"`` (all relabellings enumerated), ``"monte_carlo"`` (random relabellings,
      +1 correction) or ``"empirical"`` (observed vs given random draws, +1 correction);
    - ``n_resamples``: relabellings enumerated (exact) or drawn (Monte Carlo), or random draws;
    - ``min_p``: the smallest p this test can attain with these data;
    - ``how``: one line for tables, e.g. ``"exact, 720 permutations"``.

    ``float(result)`` is the p-value; ``to_dict()`` / ``to_json()``.
    """

    statistic: float
    p_value: float
    alternative: str
    method: str
    n_resamples: int
    min_p: float
    how: str

    def __float__(self) -> float:
        return self.p_value


class BlockPermutations:
    """Permutations of ``n`` items that move items only within their block (one block = all items).

    A relabelling is an index row ``idx`` of length ``n``: position ``i`` takes the value of item
    ``idx[i]``. Items in no block stay put. ``count = prod_b len(b)!``.
    """

    noun = "permutations"

    def __init__(self, n: int, blocks: Sequence[Sequence[int] | Int[np.ndarray, " _block"]]):
        self.n = int(n)
        self.blocks = [np.asarray(b, dtype=np.intp) for b in blocks if len(b) > 1]
        seen = np.concatenate(self.blocks) if self.blocks else np.zeros(0, dtype=np.intp)
        if len(set(seen.tolist())) != seen.size or (seen.size and (seen.min() < 0 or seen.max() >= self.n)):
            raise ValueError(f"blocks must be disjoint sets of positions in 0..{self.n - 1}; got {blocks}")
        self.count = math.prod(math.factorial(b.size) for b in self.blocks)
        self.identity = np.arange(self.n)

    def batches(self, chunk: int) -> Iterator[Int[np.ndarray, "batch n"]]:
        """Every relabelling once (the identity first), in batches of ``chunk`` rows."""
        perms = [np.array(list(itertools.permutations(b.tolist())), dtype=np.intp) for b in self.blocks]
        radices = [p.shape[0] for p in perms]
        for start in range(0, self.count, chunk):
            rows = np.arange(start, min(self.count, start + chunk))
            out = np.tile(self.identity, (rows.size, 1))
            if perms:
                for block, p, digit in zip(self.blocks, perms, np.unravel_index(rows, radices)):
                    out[:, block] = p[digit]
            yield out

    def sample(self, rng: np.random.Generator, m: int) -> Int[np.ndarray, "m n"]:
        """``m`` uniform random relabellings."""
        out = np.tile(self.identity, (m, 1))
        for block in self.blocks:
            out[:, block] = rng.permuted(np.broadcast_to(block, (m, block.size)), axis=1)
        return out


class Labellings:
    """All ways to mark ``k`` of ``n`` items (``count = C(n, k)``); the observed marking is ``inside``.

    A relabelling is an index row of length ``k``: the items marked.
    """

    noun = "labellings"

    def __init__(self, n: int, inside: Sequence[int] | Int[np.ndarray, " k"]):
        self.n = int(n)
        self.identity = np.sort(np.asarray(inside, dtype=np.intp))
        self.k = self.identity.size
        if len(set(self.identity.tolist())) != self.k or (self.k and (self.identity[0] < 0 or self.identity[-1] >= n)):
            raise ValueError(f"inside must be distinct positions in 0..{self.n - 1}; got {list(inside)}")
        self.count = math.comb(self.n, self.k)

    def batches(self, chunk: int) -> Iterator[Int[np.ndarray, "batch k"]]:
        combos = itertools.combinations(range(self.n), self.k)
        while batch := list(itertools.islice(combos, chunk)):
            yield np.array(batch, dtype=np.intp).reshape(len(batch), self.k)

    def sample(self, rng: np.random.Generator, m: int) -> Int[np.ndarray, "m k"]:
        return rng.permuted(np.broadcast_to(np.arange(self.n), (m, self.n)), axis=1)[:, : self.k]


_ALTERNATIVES = ("two-sided", "greater", "less")


def _check_alternative(alternative: str, allowed: Sequence[str] = _ALTERNATIVES) -> None:
    if alternative not in allowed:
        raise ValueError(f"alternative must be one of {', '.join(map(repr, allowed))}; got {alternative!r}")


def _check_n_permutations(n_permutations: int) -> None:
    if n_permutations < MIN_MONTE_CARLO:
        raise ValueError(
            f"n_permutations={n_permutations} is below the {MIN_MONTE_CARLO:,} Monte-Carlo permutations the "
            f"project requires (DESIGN.md, Statistics): leave the argument out or pass >= {MIN_MONTE_CARLO:,}"
        )


def permutation_test(
    statistic: Callable[[Int[np.ndarray, "batch width"]], Float[np.ndarray, " batch"]],
    relabellings: BlockPermutations | Labellings,
    *,
    alternative: str = "two-sided",
    n_permutations: int = MIN_MONTE_CARLO,
    seed: int = 0,
    max_exact: int = MAX_EXACT,
) -> PValue:
    """The permutation p-value of ``statistic`` under ``relabellings``; exact when feasible.

    ``statistic`` maps a batch of relabellings (index rows, see :class:`BlockPermutations`,
    :class:`Labellings`) to one value each, vectorised; the observed value is
    ``statistic(identity)``. If ``relabellings.count <= max_exact`` all of them are enumerated and
    ``p = #{extreme} / count``; else ``n_permutations`` (>= 20,000) seeded random ones are drawn and
    ``p = (1 + #{extreme}) / (1 + n_permutations)`` (``n_permutations < 20,000`` is a ValueError even when
    the test turns out exact). ``alternative``: ``"two-sided"`` counts
    ``|T| >= |t|`` (for statistics centred at 0 under the null, such as rho), ``"greater"``
    ``T >= t``, ``"less"`` ``T <= t``; all with a tolerance of ``1e-9 * max(1, |t|)``.
    """
    _check_alternative(alternative)
    _check_n_permutations(n_permutations)  # also when exact: the same call must not fail only on larger inputs
    observed = float(np.asarray(statistic(relabellings.identity[None]))[0])
    if not np.isfinite(observed):
        raise ValueError(f"the observed statistic is {observed}: check the inputs for NaN / constant values")

    def extreme(null: np.ndarray, t: float) -> np.ndarray:
        tol = _tolerance(t)
        if alternative == "two-sided":
            return np.abs(null) >= abs(t) - tol
        return null >= t - tol if alternative == "greater" else null <= t + tol

    noun = relabellings.noun
    if relabellings.count <= max_exact:
        null = np.concatenate([np.asarray(statistic(b), dtype=float) for b in relabellings.batches(_CHUNK)])
        count = int(relabellings.count)
        most = {"two-sided": lambda v: float(np.abs(v).max()), "greater": lambda v: float(v.max()),
                "less": lambda v: float(v.min())}[alternative](null)
        return PValue(
            statistic=observed,
            p_value=float(extreme(null, observed).sum() / count),
            alternative=alternative,
            method="exact",
            n_resamples=count,
            min_p=float(extreme(null, most).sum() / count),
            how=f"exact, {count:,} {noun}",
        )
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_permutations, _CHUNK):
        m = min(_CHUNK, n_permutations - start)
        hits += int(extreme(np.asarray(statistic(relabellings.sample(rng, m)), dtype=float), observed).sum())
    return PValue(
        statistic=observed,
        p_value=(1 + hits) / (1 + n_permutations),
        alternative=alternative,
        method="monte_carlo",
        n_resamples=int(n_permutations),
        min_p=1 / (1 + n_permutations),
        how=f"Monte Carlo, {n_permutations:,} {noun}, +1 correction",
    )


def binomial_p(successes: int, trials: int, *, chance: float = 0.5, alternative: str = "greater") -> PValue:
    """Exact binomial test of ``successes`` out of ``trials`` against success probability ``chance``
    (scipy.stats.binomtest), e.g. "is the two-way accuracy after ablation above chance (0.5)?": one-sided
    ``"greater"`` by default. ``min_p`` is chance**trials (all successes), for ``"greater"``."""
    _check_alternative(alternative, ("greater", "less", "two-sided"))
    if not (0 <= successes <= trials and trials > 0 and 0 < chance < 1):
        raise ValueError(f"need 0 <= successes <= trials, trials > 0 and 0 < chance < 1; got {successes}, {trials}, {chance}")
    p = float(stats.binomtest(int(successes), int(trials), chance, alternative=alternative).pvalue)
    edge = chance if alternative != "less" else 1 - chance
    return PValue(statistic=successes / trials, p_value=p, alternative=alternative, method="exact",
                  n_resamples=0, min_p=float(min(edge**trials * (2 if alternative == "two-sided" else 1), 1.0)),
                  how=f"exact binomial, {successes} of {trials} vs {chance:g}")


def empirical_p(observed: float, draws: Sequence[float] | Real[np.ndarray, " n"], *, alternative: str) -> PValue:
    """p of an observed value against the same quantity under ``n`` random draws.

    For controls such as "ablate the circuit vs ablate random head sets of the same size":
    ``p = (1 + #{draws at least as extreme as observed}) / (1 + n)``, where ``alternative="less"``
    counts draws ``<= observed`` (e.g. a normalised logit difference: lower = more harmful) and
    ``"greater"`` draws ``>= observed`` (float tolerance ``1e-9 * max(1, |observed|)``). The +1 counts
    the observed value as one of the draws, so the p is valid (never too small) and never below
    ``min_p = 1 / (1 + n)``: with 30 random sets no result can go below 1/31 ~ 0.032, whatever the effect.
    """
    _check_alternative(alternative, ("greater", "less"))
    values = np.asarray(draws, dtype=float).reshape(-1)
    if not np.isfinite(observed) or not np.isfinite(values).all():
        raise ValueError("observed and draws must be finite numbers: drop or recompute the NaN / inf entries")
    tol = _tolerance(observed)
    hits = int((values >= observed - tol).sum() if alternative == "greater" else (values <= observed + tol).sum())
    n = values.size
    return PValue(
        statistic=float(observed),
        p_value=(1 + hits) / (1 + n),
        alternative=alternative,
        method="empirical",
        n_resamples=n,
        min_p=1 / (1 + n),
        how=f"empirical, {n:,} random draws, +1 correction",
    )


# ---------------------------------------------------------------------------------------------------
# Set statistics
# ---------------------------------------------------------------------------------------------------


def as_head_set(heads: HeadSet) -> frozenset[Head]:
    """A frozenset of ``(layer, head)`` from a Circuit, tuples or ``"L.H"`` strings."""
    if isinstance(heads, HeadScores):
        raise ValueError("got HeadScores where a head set was expected: take its top-k (scores.top(k)) or use compare()")
    if isinstance(heads, Circuit):
        return heads.heads
    return frozenset(parse_head(h) if isinstance(h, str) else (int(h[0]), int(h[1])) for h in heads)


@dataclass(frozen=True)
class SetOverlap(MappingResult):
    """Two head sets ``a`` and ``b`` drawn from ``n_total`` heads (:func:`set_overlap`).

    - ``intersection``: the shared heads, ``"L.H"``, sorted by (layer, head);
    - ``size_a``, ``size_b``, ``size_intersection``: ``|a|``, ``|b|``, ``|a & b|``;
    - ``n_total`` (and ``n``, the same number under the name :class:`TestRow` reads): the population;
    - ``jaccard`` = ``|a & b| / |a | b|``, ``overlap_coefficient`` = ``|a & b| / min(|a|, |b|)``
      (both 0 when a denominator is 0);
    - ``expected`` = ``|a| |b| / n_total``: the mean intersection of random sets of these sizes;
    - ``p_value`` = hypergeometric ``P(X >= |a & b|)`` (exact, one-sided: "more overlap than chance";
      1 for an empty set); ``p_method`` = ``"exact, hypergeometric"``;
    - ``min_p``: the p of the largest possible overlap, ``min(|a|, |b|)``.
    """

    intersection: tuple[str, ...]
    size_a: int
    size_b: int
    size_intersection: int
    n_total: int
    n: int
    jaccard: float
    overlap_coefficient: float
    expected: float
    p_value: float
    p_method: str
    min_p: float


def set_overlap(a: HeadSet, b: HeadSet, n_total: int) -> SetOverlap:
    """Intersection, Jaccard, overlap coefficient and hypergeometric p-value of two head sets.

    ``n_total`` = number of heads the sets were drawn from (``n_layers * n_heads``). ``expected``
    is the mean intersection size for random sets of the same sizes, ``|a| |b| / n_total``;
    ``min_p`` the p of the largest possible overlap (``min(|a|, |b|)``). Fields: :class:`SetOverlap`.
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
    return SetOverlap(
        intersection=tuple(head_name(h) for h in sorted(inter)),
        size_a=len(sa),
        size_b=len(sb),
        size_intersection=len(inter),
        n_total=int(n_total),
        n=int(n_total),
        jaccard=len(inter) / len(union) if union else 0.0,
        overlap_coefficient=len(inter) / smaller if smaller else 0.0,
        expected=len(sa) * len(sb) / n_total,
        p_value=hypergeom_p(len(inter), n_total, len(sa), len(sb)),
        p_method="exact, hypergeometric",
        min_p=hypergeom_p(smaller, n_total, len(sa), len(sb)),
    )


def hypergeom_p(observed: int, n_total: int, size_a: int, size_b: int) -> float:
    """``P(X >= observed)`` for ``X`` ~ Hypergeometric(population ``n_total``, ``size_a`` successes,
    ``size_b`` draws): the chance of at least this much overlap between random sets."""
    return float(min(1.0, stats.hypergeom.sf(observed - 1, n_total, size_a, size_b)))


# ---------------------------------------------------------------------------------------------------
# Rank statistics
# ---------------------------------------------------------------------------------------------------


def _flat_scores(x: HeadScores, absolute: bool = False) -> Float[np.ndarray, " n_total"]:
    values = x.scores.abs() if absolute else x.scores
    return values.flatten().double().numpy()


def _check_same_grid(a: HeadScores, b: HeadScores) -> None:
    if a.scores.shape != b.scores.shape:
        raise ValueError(
            f"the two scorings cover different heads ({tuple(a.scores.shape)} vs {tuple(b.scores.shape)}): "
            "compare scores of the same model"
        )


def _flat_names(x: HeadScores, idx: Int[np.ndarray, " n"]) -> list[str]:
    """``"L.H"`` names of flat head indices ``layer * n_heads + head`` on ``x``'s grid."""
    return [head_name((int(i) // x.n_heads, int(i) % x.n_heads)) for i in idx]


def _flat_index(x: HeadScores, heads: Iterable[Head], what: str) -> Int[np.ndarray, " n"]:
    """Sorted flat indices ``layer * n_heads + head`` of ``heads``, checked against ``x``'s grid."""
    idx = []
    for l, h in heads:
        if not (0 <= l < x.n_layers and 0 <= h < x.n_heads):
            raise ValueError(f"{what} head {head_name((l, h))} is outside the {x.n_layers}x{x.n_heads} scores: "
                             "pass heads of the scored model")
        idx.append(l * x.n_heads + h)
    return np.array(sorted(idx), dtype=np.intp)


@dataclass(frozen=True, kw_only=True)
class PermutationStatistic(MappingResult):
    """The p fields of a rank statistic tested with :func:`permutation_test` (all ``None`` when the
    statistic is undefined; then the result's ``note`` says why):

    - ``p_value``: the permutation p (exact: ``#{extreme} / count``; Monte Carlo: ``(1 + #{extreme}) /
      (1 + n_permutations)``; "extreme" with a float tolerance of ``1e-9 * max(1, |observed|)``);
    - ``p_method``: how p was obtained (``"exact, 720 permutations"``, ``"Monte Carlo, 20,000
      permutations, +1 correction"``); ``exact``: whether every relabelling was enumerated;
    - ``n_permutations``: relabellings enumerated or drawn; ``min_p``: the smallest p attainable with
      these data.
    """

    _optional: ClassVar[tuple[str, ...]] = ("note",)

    p_value: float | None = None
    p_method: str | None = None
    exact: bool | None = None
    n_permutations: int | None = None
    min_p: float | None = None

    @staticmethod
    def p_fields(res: PValue) -> dict[str, Any]:
        """These fields from a :func:`permutation_test` result."""
        return dict(p_value=res.p_value, p_method=res.how, exact=res.method == "exact",
                    n_permutations=res.n_resamples, min_p=res.min_p)


@dataclass(frozen=True, kw_only=True)
class RankCorrelation(PermutationStatistic):
    """Spearman's rho between two scorings of the same heads (:func:`rank_correlation`).

    - ``rho``: Spearman's rho, average ranks for ties, ranks taken among the ``n`` heads compared;
    - the p fields of :class:`PermutationStatistic`: two-sided, ``|rho_perm| >= |rho|``;
    - ``n``: heads compared; ``heads``: their names, or ``None`` for all heads of the grid;
    - ``permutations``: ``"all heads"`` or ``"within layers"`` (the null permutes one scoring only
      within each layer); ``alternative``: ``"two-sided"``;
    - ``note``: only when rho is undefined (fewer than 2 heads, or a constant scoring); then ``rho``
      and the p fields are ``None``.
    """

    rho: float | None
    n: int
    heads: tuple[str, ...] | None
    permutations: str
    alternative: str = "two-sided"
    note: str | None = None


def rank_correlation(
    a: HeadScores,
    b: HeadScores,
    *,
    heads: HeadSet | None = None,
    within_layers: bool = False,
    absolute: bool = False,
    n_permutations: int = MIN_MONTE_CARLO,
    seed: int = 0,
) -> RankCorrelation:
    """Spearman's rho between two scorings of the same heads, with a two-sided permutation p-value.

    ``heads``: compare only these heads (e.g. the model's live heads; ranks are taken within them),
    default all. ``within_layers``: permute heads only within each layer (``prod_l n_l!``
    relabellings), so the null keeps each layer's score distribution; a small p then means agreement
    beyond "both scorings favour the same layers". p from :func:`permutation_test` (exact when the
    relabellings number <= 50,000, e.g. up to 8 heads over all heads; else ``n_permutations`` >= 20,000
    Monte-Carlo draws, one matrix product per batch).

    Returns a :class:`RankCorrelation`. If either scoring is constant on the heads compared (or fewer
    than 2 heads), rho is undefined: ``rho``, ``p_value`` and ``min_p`` are ``None`` and ``note`` says why.
    """
    _check_same_grid(a, b)
    idx = (np.arange(a.scores.numel()) if heads is None
           else _flat_index(a, as_head_set(heads), "a requested"))
    n = int(idx.size)
    described = dict(n=n, heads=None if heads is None else tuple(_flat_names(a, idx)),
                     permutations="within layers" if within_layers else "all heads")
    ra = stats.rankdata(_flat_scores(a, absolute)[idx])
    rb = stats.rankdata(_flat_scores(b, absolute)[idx])
    if n < 2 or ra.std() == 0 or rb.std() == 0:
        return RankCorrelation(rho=None, note="fewer than 2 heads or a constant scoring: rank correlation undefined",
                               **described)
    za = (ra - ra.mean()) / ra.std()
    zb = (rb - rb.mean()) / rb.std()
    layers = idx // a.n_heads
    blocks = [np.flatnonzero(layers == l) for l in np.unique(layers)] if within_layers else [np.arange(n)]
    res = permutation_test(lambda perm: zb[perm] @ za / n, BlockPermutations(n, blocks),
                           alternative="two-sided", n_permutations=n_permutations, seed=seed)
    return RankCorrelation(rho=res.statistic, **RankCorrelation.p_fields(res), **described)


@dataclass(frozen=True, kw_only=True)
class CircuitRankTest(PermutationStatistic):
    """Do a circuit's heads score higher than the other heads? (:func:`circuit_rank_test`)

    - ``auroc``: the probability that a random circuit head outscores a random other head, ties
      counting 1/2 (0.5 = no relation, 1 = every circuit head above every other head);
    - the p fields of :class:`PermutationStatistic`: one-sided (``AUROC_perm >= AUROC``), the null
      making every choice of ``n_in`` of the ``n`` heads equally likely (``C(n, n_in)`` labellings);
    - ``alternative``: ``"greater (circuit heads score higher)"``;
    - ``n``: heads compared, ``n_in`` / ``n_out``: inside / outside the circuit;
    - ``mean_score_in`` / ``mean_score_out``: mean score inside / outside (only when defined);
    - ``note``: only when no head is inside or none outside; then the p fields are ``None``.
    """

    _optional: ClassVar[tuple[str, ...]] = ("note", "mean_score_in", "mean_score_out")

    auroc: float | None
    alternative: str
    n: int
    n_in: int
    n_out: int
    note: str | None = None
    mean_score_in: float | None = None
    mean_score_out: float | None = None


def circuit_rank_test(
    scores: HeadScores,
    circuit: HeadSet,
    *,
    heads: HeadSet | None = None,
    absolute: bool = False,
    n_permutations: int = MIN_MONTE_CARLO,
    seed: int = 0,
) -> CircuitRankTest:
    """Do circuit heads score higher than the other heads? AUROC with a one-sided permutation p.

    ``heads``: compare only among these heads (e.g. the live heads: the circuit must lie inside
    them), default all heads.

    AUROC = probability that a random circuit head outscores a random non-circuit head (ties 1/2);
    0.5 = no relation. Null: the ``k`` circuit heads are any ``k`` of the ``n`` heads, all ``C(n, k)``
    choices equally likely; p = share with AUROC >= observed (exact when ``C(n, k) <= 50,000``, e.g.
    3 of 24 heads: 2,024 labellings; else Monte Carlo). Needs at least one head inside and one
    outside the circuit (else ``auroc`` / ``p_value`` / ``min_p`` are ``None`` with a ``note``).

    Returns a :class:`CircuitRankTest`.
    """
    values = _flat_scores(scores, absolute)
    inside = _flat_index(scores, as_head_set(circuit), "circuit")
    if heads is not None:
        among = _flat_index(scores, as_head_set(heads), "compared")
        missing = np.setdiff1d(inside, among)
        if missing.size:
            raise ValueError(f"circuit heads {_flat_names(scores, missing)} "
                             "are not among the heads compared: pass heads= that contain the circuit")
        values, inside = values[among], np.searchsorted(among, inside)
    n, k = values.size, int(inside.size)
    described = dict(alternative="greater (circuit heads score higher)", n=n, n_in=k, n_out=n - k)
    if k == 0 or k == n:
        return CircuitRankTest(auroc=None, note="need heads both inside and outside the circuit", **described)
    ranks = stats.rankdata(values)  # average ranks: U = rank sum - k(k+1)/2 counts ties as 1/2
    scale = k * (n - k)
    res = permutation_test(lambda marked: (ranks[marked].sum(axis=1) - k * (k + 1) / 2) / scale,
                           Labellings(n, inside), alternative="greater", n_permutations=n_permutations, seed=seed)
    mask = np.zeros(n, dtype=bool)
    mask[inside] = True
    return CircuitRankTest(auroc=res.statistic, **CircuitRankTest.p_fields(res), **described,
                           mean_score_in=float(values[mask].mean()), mean_score_out=float(values[~mask].mean()))


# ---------------------------------------------------------------------------------------------------
# Top-k
# ---------------------------------------------------------------------------------------------------


def top_set(x: HeadScores, k: int, *, seed: int = 0, absolute: bool = False) -> frozenset[Head]:
    """The ``k`` highest-scoring heads, ties broken at random (seeded) rather than by head index."""
    order = _ranking(x, seed=seed, absolute=absolute)
    return frozenset((int(i) // x.n_heads, int(i) % x.n_heads) for i in order[:k])


def _ranking(x: HeadScores, *, seed: int, absolute: bool) -> Int[np.ndarray, " n_total"]:
    values = _flat_scores(x, absolute)
    tiebreak = np.random.default_rng(seed).random(values.size)
    return np.lexsort((tiebreak, -values))  # best first


@dataclass(frozen=True)
class TopkOverlapCurve(MappingResult):
    """``|top-k(a) & top-k(b)|`` over a sweep of k (:func:`topk_overlap_curve`).

    - ``names``: ``"method:target"`` of ``a`` and ``b``;
    - ``k``: the k swept; ``observed``: heads in both top-k sets at each k (ties broken at random with
      ``seed`` for ``a`` and ``seed + 1`` for ``b``); ``expected`` = ``k^2 / n_total`` (chance);
    - ``p_value``: hypergeometric ``P(X >= observed)`` at each k, descriptive (one curve, many
      overlapping tests, no correction);
    - ``n_total``: heads on the grid.
    """

    names: tuple[str, str]
    k: tuple[int, ...]
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    p_value: tuple[float, ...]
    n_total: int


def topk_overlap_curve(
    a: HeadScores, b: HeadScores, ks: Sequence[int] | None = None, *, seed: int = 0, absolute: bool = False
) -> TopkOverlapCurve:
    """|top-k(a) & top-k(b)| for a sweep of k, with chance ``k^2 / N`` and a hypergeometric p per k.

    ``ks`` defaults to ``1 .. min(N, 50)``. Ties are broken at random (``seed``), independently for
    ``a`` and ``b`` (different streams). The per-k p-values are descriptive (one curve, many
    overlapping tests): put at most one chosen k into a :func:`test_table`.
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
    return TopkOverlapCurve(
        names=(_describe_short(a), _describe_short(b)),
        k=tuple(ks),
        observed=tuple(observed),
        expected=tuple(k * k / n for k in ks),
        p_value=tuple(hypergeom_p(o, n, k, k) for o, k in zip(observed, ks)),
        n_total=n,
    )


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


# ---------------------------------------------------------------------------------------------------
# compare(): the statistics that fit two objects
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison(Result):
    """What :func:`compare` found; fields that do not apply to ``kind`` are ``None``.

    - ``kind``: ``"scores_vs_scores"``, ``"scores_vs_set"`` or ``"set_vs_set"``;
    - ``a``, ``b``: what was compared (type, method / task, model, heads);
    - ``set``: :func:`set_overlap` of the two top-``top_k`` sets (scores vs scores), of the
      top-``top_k`` heads with the set (scores vs set), or of the two sets;
    - ``top_k``: k of those top sets (``None`` for set vs set);
    - ``rank``, ``rank_within_layers``: :func:`rank_correlation` over all heads, permuting over all
      heads / within layers (scores vs scores);
    - ``topk_curve``: :func:`topk_overlap_curve` (scores vs scores);
    - ``rank_test``: :func:`circuit_rank_test` of the set's heads under the scores (scores vs set).

    ``to_dict()`` gives the JSON-able dict (without the ``None`` fields); ``c["rank"]`` reads it
    there, ``c.rank`` is the :class:`RankCorrelation` itself.
    """

    _optional: ClassVar[tuple[str, ...]] = ("top_k", "rank", "rank_within_layers", "topk_curve", "rank_test")

    kind: str
    a: dict[str, Any]
    b: dict[str, Any]
    set: SetOverlap
    top_k: int | None = None
    rank: RankCorrelation | None = None
    rank_within_layers: RankCorrelation | None = None
    topk_curve: TopkOverlapCurve | None = None
    rank_test: CircuitRankTest | None = None


def compare(
    a: HeadScores | HeadSet,
    b: HeadScores | HeadSet,
    *,
    top_k: int | None = None,
    n_total: int | None = None,
    n_permutations: int = MIN_MONTE_CARLO,
    seed: int = 0,
    absolute: bool = False,
) -> Comparison:
    """Compare two head scorings or head sets with the statistics that fit their types.

    - scores vs scores: rank correlation (p-values from permutations over all heads and within
      layers), top-k overlap curve, set overlap of the two top-``top_k`` sets (default
      :func:`default_top_k`);
    - scores vs set (either order): set overlap of top-``|set|`` (or ``top_k``) with the set, and
      :func:`circuit_rank_test` (do the set's heads score higher?);
    - set vs set: :func:`set_overlap`; needs ``n_total`` unless a HeadScores fixes the grid.

    ``n_permutations`` / ``seed``: Monte-Carlo draws when exact enumeration is infeasible (>= 20,000).
    """
    a_scores, b_scores = isinstance(a, HeadScores), isinstance(b, HeadScores)
    desc = dict(a=_describe(a), b=_describe(b))
    if a_scores and b_scores:
        _check_same_grid(a, b)
        n = a.scores.numel()
        k = top_k or default_top_k(n)
        kw = dict(n_permutations=n_permutations, seed=seed, absolute=absolute)
        return Comparison(
            kind="scores_vs_scores", **desc,
            rank=rank_correlation(a, b, **kw),
            rank_within_layers=rank_correlation(a, b, within_layers=True, **kw),
            topk_curve=topk_overlap_curve(a, b, seed=seed, absolute=absolute),
            top_k=k,
            set=set_overlap(top_set(a, k, seed=seed, absolute=absolute),
                            top_set(b, k, seed=seed + 1, absolute=absolute), n),
        )
    if a_scores or b_scores:
        scores, heads = (a, b) if a_scores else (b, a)
        heads = as_head_set(heads)
        n = scores.scores.numel()
        k = top_k or len(heads) or default_top_k(n)
        top = top_set(scores, k, seed=seed, absolute=absolute)
        sets = (top, heads) if a_scores else (heads, top)
        return Comparison(kind="scores_vs_set", **desc, top_k=k, set=set_overlap(*sets, n),
                          rank_test=circuit_rank_test(scores, heads, absolute=absolute,
                                                      n_permutations=n_permutations, seed=seed))
    if n_total is None:
        raise ValueError("comparing two head sets needs n_total (the model's n_layers * n_heads)")
    return Comparison(kind="set_vs_set", **desc, set=set_overlap(a, b, n_total))


# ---------------------------------------------------------------------------------------------------
# A family of tests: one table, one correction
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestRow(Result):
    """One test of a family.

    - ``name``: what is tested, for people (``"MAPS copying vs capital: Spearman (live heads)"``);
    - ``statistic``: the statistic's name (``"rho"``, ``"auroc"``, ``"shared heads"``, ...);
    - ``value``: its observed value;
    - ``p``: the p-value;
    - ``how``: how p was obtained (``"exact, 720 permutations"``, ``"exact, hypergeometric"``, ...);
    - ``n``: the size the test's resolution depends on (heads compared; random draws for an empirical p);
    - ``min_p``: the smallest p the test can attain at this ``n`` with these data.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class

    name: str
    statistic: str
    value: float | int | None
    p: float
    how: str
    n: int
    min_p: float

    @classmethod
    def from_result(cls, name: str, result: Mapping[str, Any] | PValue, *, statistic: str) -> "TestRow":
        """A row from a :class:`PValue`, a :class:`RankCorrelation`, :class:`CircuitRankTest` or
        :class:`SetOverlap` (or a dict with their keys); ``statistic`` names the value's field
        (``"rho"``, ``"auroc"``, ``"size_intersection"``; for a PValue just a label)."""
        if isinstance(result, PValue):
            return cls(name, statistic, result.statistic, result.p_value, result.how, result.n_resamples, result.min_p)
        if result.get("p_value") is None:
            raise ValueError(f"{name!r} has no p-value ({result.get('note', 'undefined')}): leave it out of the "
                             "family or give it p = 1 explicitly as a TestRow")
        return cls(name, statistic, result[statistic], float(result["p_value"]), result["p_method"],
                   int(result["n"]), float(result["min_p"]))


def adjust_p_values(p: Sequence[float], correction: str = "holm") -> list[float]:
    """Family-wise adjusted p-values, in the input order.

    ``"holm"``: sort ascending, ``adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    ``"bonferroni"``: ``min(1, m p)``.
    """
    values = np.asarray(p, dtype=float)
    m = values.size
    if correction == "bonferroni":
        return np.minimum(1.0, m * values).tolist()
    if correction != "holm":
        raise ValueError(f"correction must be 'holm' or 'bonferroni'; got {correction!r}")
    order = np.argsort(values, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * values[order]))
    out = np.empty(m)
    out[order] = stepped
    return out.tolist()


@dataclass(frozen=True)
class TestTable(Result):
    """A family of tests with family-wise adjusted p-values (see :func:`test_table`).

    Per row (same order as ``rows``): ``adjusted_p``; ``significant`` = ``adjusted_p <= alpha``;
    ``can_reach`` = whether the row *could* be significant in this table, i.e. would be if its p
    were its ``min_p`` (other rows as observed). ``can_reach`` False means: at this ``n`` the test
    cannot show anything here, whatever the data.
    """

    __test__: ClassVar[bool] = False

    rows: tuple[TestRow, ...]
    alpha: float
    correction: str
    adjusted_p: tuple[float, ...]
    significant: tuple[bool, ...]
    can_reach: tuple[bool, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "correction": self.correction,
            "n_tests": len(self.rows),
            "rows": [{**asdict(r), "adjusted_p": a, "significant": s, "can_reach": c}
                     for r, a, s, c in zip(self.rows, self.adjusted_p, self.significant, self.can_reach)],
        }

    def to_markdown(self) -> str:
        corr = {"holm": "Holm", "bonferroni": "Bonferroni"}[self.correction]
        lines = [f"| test | statistic | value | p | how p was obtained | n | smallest possible p "
                 f"| p ({corr}) | significant | can reach |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r, a, s, c in zip(self.rows, self.adjusted_p, self.significant, self.can_reach):
            value = "n/a" if r.value is None else (f"{r.value:.3f}" if isinstance(r.value, float) else str(r.value))
            lines.append(f"| {r.name.replace('|', chr(92) + '|')} | {r.statistic} | {value} | {r.p:.3g} | {r.how} "
                         f"| {r.n} | {r.min_p:.3g} | {a:.3g} | {'yes' if s else 'no'} | {'yes' if c else 'no'} |")
        lines += ["", f"{len(self.rows)} tests, {corr} correction over this table at alpha = {self.alpha:g}: a test is "
                      f"significant when its adjusted p <= {self.alpha:g}. 'can reach' = whether the test's smallest "
                      "possible p at its n would be significant here; 'no' means it cannot show anything at this n."]
        return "\n".join(lines)


def test_table(rows: Sequence[TestRow], *, alpha: float = 0.05, correction: str = "holm") -> TestTable:
    """One family of tests, corrected over its rows (Holm by default, or Bonferroni).

    Build every table of p-values a notebook or the report shows with this, once per family.
    """
    rows = tuple(rows)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    for r in rows:
        if r.p is None or not 0 <= r.p <= 1 or not 0 < r.min_p <= 1:
            raise ValueError(f"test {r.name!r}: p = {r.p} and min_p = {r.min_p} must lie in [0, 1] (min_p > 0): "
                             "pass the test's p-value and its smallest attainable p")
        if r.p < r.min_p * (1 - 1e-9):
            raise ValueError(f"test {r.name!r}: p = {r.p:.3g} is below its smallest attainable p {r.min_p:.3g}: "
                             "the row mixes two tests; take p and min_p from the same result")
    p = [r.p for r in rows]
    adjusted = adjust_p_values(p, correction)
    can_reach = []
    for i, r in enumerate(rows):
        best = list(p)
        best[i] = r.min_p
        can_reach.append(adjust_p_values(best, correction)[i] <= alpha + _P_TOL)
    return TestTable(rows=rows, alpha=alpha, correction=correction, adjusted_p=tuple(adjusted),
                     significant=tuple(a <= alpha + _P_TOL for a in adjusted), can_reach=tuple(can_reach))


test_table.__test__ = False  # not a pytest test when imported into a test module
