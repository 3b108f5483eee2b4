"""Reuse of circuit components across tasks: ablate one task's circuit (or core) and measure another
task, against random head sets; and the whole overlap-and-reuse analysis (notebook 04, the report).

Results: :func:`cross_task_ablation` a :class:`CrossTaskAblation`, :func:`reuse_matrix` a
:class:`ReuseMatrix` (``m[c][t]``), :func:`reuse_analysis` a :class:`ReuseAnalysis` whose ``pairs`` /
``per_task`` hold :class:`TaskPair` / :class:`TaskAgreement` (these two read as the mapping of their
``to_dict()``, ``pair["maps"]["rho"]``, as the dicts they replaced); :func:`pair_reuse` a :class:`PairReuse`:
one pair of tasks as Merullo et al. (2024) compare IOI with Colored Objects (:data:`PAPER_PAIR`).

Conventions (they change numbers): ablation = mean over the *measured* task's corrupted prompts, every
position, BOS excluded (:class:`circuitlib.interventions.Ablation`); the normalised logit difference is
``(x - corrupt) / (clean - corrupt)`` (1 = clean, 0 = corrupted); random head sets hold live heads only,
layer-matched where the layers allow (:func:`circuitlib.interventions.control_sets`); p-values are
empirical, ``(1 + #sets at most as high) / (1 + n)``; rank statistics over the live heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from transformer_lens import HookedTransformer
from .interventions import Ablation, control_sets, live_heads, run_ablations
from .overlap import (
    CircuitRankTest,
    HeadSet,
    RankCorrelation,
    SetOverlap,
    TestRow,
    TestTable,
    as_head_set,
    circuit_rank_test,
    default_top_k,
    empirical_p,
    rank_correlation,
    set_overlap,
    test_table,
    TopkOverlapCurve,
    top_set,
    topk_overlap_curve,
)
from .results import MappingResult, Result
from .types import Circuit, Head, HeadScores, TaskBatch, head_name


@dataclass
class CrossTaskAblation(Result):
    """One circuit's heads ablated on one task, against random head sets (:func:`cross_task_ablation`).

    ``clean`` / ``ablated`` / ``random_mean``: two-way accuracy, top-1 accuracy, logit difference and
    normalised logit difference ((x - corrupt) / (clean - corrupt): 1 = clean, 0 = corrupted).
    ``p_value``: (1 + #random sets whose normalised logit difference is at most the circuit's) / (1 + n),
    one-sided, "the circuit hurts more than random heads" (:func:`circuitlib.overlap.empirical_p`; exact
    under "the circuit is one of the n + 1 equally likely sets" when every set was evaluated).
    Random sets come from live heads only (:func:`circuitlib.interventions.control_sets`); when too few
    live heads remain for one set, ``n_random`` is 0, ``p_value`` is None and ``p_how`` says why.
    """

    circuit: list[str]
    circuit_task: str | None
    measured_task: str
    ablation: dict
    n_prompts: int
    clean: dict[str, float]
    corrupt_logit_diff: float
    ablated: dict[str, float]
    random_how: str
    n_random: int
    exhaustive: bool
    random_mean: dict[str, float]
    random_std_normalised: float | None
    random_sets: list[list[str]]
    random_normalised: list[float]
    p_value: float | None
    p_how: str


@torch.no_grad()
def cross_task_ablation(
    model: HookedTransformer,
    circuit: HeadSet,
    batch: TaskBatch,
    *,
    ablation: Ablation = Ablation(),
    n_random: int = 2000,
    exclude: HeadSet = (),
    seed: int = 0,
) -> CrossTaskAblation:
    """Ablate ``circuit``'s heads and measure ``batch``'s task, against :func:`circuitlib.interventions.control_sets`.

    ``exclude``: heads no random set may contain besides the circuit's (pass the measured task's own
    circuit: a random set holding it would not be a fair control). Default ablation: mean over the
    measured task's corrupted prompts, every position, BOS excluded (a circuit of another task may act
    before END). Everything in one batched run.
    """
    heads = sorted(as_head_set(circuit))
    # no control set when too few live heads remain (draws.how says so): then no p-value, never dead-head controls
    draws = control_sets(model, heads, n_random, seed=seed, also_exclude=sorted(as_head_set(exclude) - set(heads)))
    run = run_ablations(model, batch, [[], heads, *draws.sets], ablation)
    corrupt = model(batch.corrupt.to(model.cfg.device))
    rows = torch.arange(len(batch))
    last = corrupt[rows, batch.end]
    ld_corrupt = float((last[rows, batch.answer] - last[rows, batch.wrong]).mean())
    ld = run.mean_logit_diff.double().numpy()
    if abs(ld[0] - ld_corrupt) <= 1e-6 * max(1.0, abs(ld_corrupt)):  # batched vs single forward: float rounding
        raise ValueError(f"the {batch.task} clean and corrupted prompts give the same logit difference: the "
                         "normalised metric is undefined; use a corruption that changes the answer")
    norm = (ld - ld_corrupt) / (ld[0] - ld_corrupt)
    acc, top1 = run.accuracy.numpy(), run.top1_accuracy.numpy()

    def at(i):
        return {"accuracy": round(float(acc[i]), 4), "top1_accuracy": round(float(top1[i]), 4),
                "logit_diff": round(float(ld[i]), 4), "normalised": round(float(norm[i]), 4)}

    rand = slice(2, None)
    r_norm = norm[rand]
    pv = empirical_p(float(norm[1]), r_norm, alternative="less") if r_norm.size else None
    return CrossTaskAblation(
        circuit=[head_name(h) for h in heads], circuit_task=circuit.task if isinstance(circuit, Circuit) else None,
        measured_task=batch.task, ablation=ablation.to_dict(), n_prompts=len(batch), clean=at(0),
        corrupt_logit_diff=round(ld_corrupt, 4), ablated=at(1), random_how=draws.how, n_random=len(draws),
        exhaustive=draws.exhaustive,
        random_mean={} if not r_norm.size else {
            "accuracy": round(float(acc[rand].mean()), 4), "top1_accuracy": round(float(top1[rand].mean()), 4),
            "logit_diff": round(float(ld[rand].mean()), 4), "normalised": round(float(r_norm.mean()), 4)},
        random_std_normalised=round(float(r_norm.std()), 4) if r_norm.size else None,
        random_sets=[[head_name(h) for h in s] for s in draws.sets], random_normalised=[round(float(v), 4) for v in r_norm],
        p_value=None if pv is None else pv.p_value, p_how=draws.how if pv is None else pv.how)


def _top_live(scores: HeadScores, k: int, live: list[Head], seed: int) -> frozenset[Head]:
    """The top-k heads among the live heads (ties broken at random, seeded)."""
    masked = scores.scores.clone()
    keep = torch.zeros_like(masked, dtype=torch.bool)
    for l, h in live:
        keep[l, h] = True
    masked[~keep] = -float("inf")
    return top_set(HeadScores(masked, scores.method, scores.target, scores.model), k, seed=seed)


@dataclass(frozen=True)
class ReuseMatrix(Result, Mapping):
    """:func:`cross_task_ablation` for every (ablated circuit, measured task) pair (:func:`reuse_matrix`).

    ``m[c][t]`` (or ``m.cell(c, t)``) is the :class:`CrossTaskAblation` of task ``c``'s circuit measured
    on task ``t``; ``circuit_tasks`` / ``measured_tasks`` give the order of rows / columns. Reads as the
    mapping ``circuit task -> {measured task: CrossTaskAblation}`` it once was; ``to_dict()`` is that
    nesting in JSON (``{c: {t: cell}}``), as before.
    """

    circuit_tasks: tuple[str, ...]
    measured_tasks: tuple[str, ...]
    cells: dict[tuple[str, str], CrossTaskAblation]

    def cell(self, circuit_task: str, measured_task: str) -> CrossTaskAblation:
        return self.cells[circuit_task, measured_task]

    def __getitem__(self, circuit_task: str) -> dict[str, CrossTaskAblation]:
        if circuit_task not in self.circuit_tasks:
            raise KeyError(circuit_task)
        return {t: self.cells[circuit_task, t] for t in self.measured_tasks}

    def __iter__(self) -> Iterator[str]:
        return iter(self.circuit_tasks)

    def __len__(self) -> int:
        return len(self.circuit_tasks)

    def to_dict(self) -> dict[str, Any]:
        return {c: {t: self.cells[c, t].to_dict() for t in self.measured_tasks} for c in self.circuit_tasks}


def reuse_matrix(
    model: HookedTransformer, circuits: dict[str, HeadSet], batches: dict[str, TaskBatch], **kwargs
) -> ReuseMatrix:
    """:func:`cross_task_ablation` for every (ablated circuit, measured task) pair.

    ``result[circuit_task][measured_task]``; the diagonal is each circuit's own task (a positive
    control: removing a task's circuit should hurt that task). Off the diagonal, random sets also
    exclude the measured task's own circuit. ``kwargs`` go to :func:`cross_task_ablation` (default:
    mean-ablation over the measured task's corrupted prompts, every position, BOS excluded; 2,000
    random sets, seed 0).
    """
    cells = {(c, t): cross_task_ablation(model, circuit, batch, exclude=circuits.get(t, ()) if t != c else (), **kwargs)
             for c, circuit in circuits.items() for t, batch in batches.items()}
    return ReuseMatrix(circuit_tasks=tuple(circuits), measured_tasks=tuple(batches), cells=cells)


MIN_DRAWS_IN_FAMILY = 2000


@dataclass(frozen=True, kw_only=True)
class TaskPair(MappingResult):
    """Two tasks ``a``, ``b`` compared (one entry of :attr:`ReuseAnalysis.pairs`, key ``"a|b"``).

    - ``circuits``: :func:`~circuitlib.overlap.set_overlap` of the two circuits (drawn from the live
      heads when every circuit head is live, else from all heads);
    - ``patching``: Spearman of |patching a| vs |patching b| over the live heads;
    - ``maps``, ``maps_top``, ``maps_topk_curve`` (only when both tasks have MAPS relations and they
      differ, else left out): Spearman of the two relations' MAPS scores over the live heads; overlap of
      their top-k live heads (k = :func:`~circuitlib.overlap.default_top_k` of the live heads, ties broken
      with ``seed`` / ``seed + 1``); the top-k overlap curve over all heads.

    Reads as the mapping of its ``to_dict()`` (``pair["maps"]["rho"]``), as the dict it once was.
    """

    _optional: ClassVar[tuple[str, ...]] = ("maps", "maps_top", "maps_topk_curve")

    circuits: SetOverlap
    patching: RankCorrelation
    maps: RankCorrelation | None = None
    maps_top: SetOverlap | None = None
    maps_topk_curve: TopkOverlapCurve | None = None


@dataclass(frozen=True, kw_only=True)
class TaskAgreement(MappingResult):
    """MAPS against causal discovery on one task (one entry of :attr:`ReuseAnalysis.per_task`).

    - ``maps_vs_patching``: Spearman of the task relation's MAPS scores vs |patching| over the live heads;
    - ``circuit_under_maps``: :func:`~circuitlib.overlap.circuit_rank_test` (AUROC) of the circuit's
      heads under the MAPS scores, within the live heads when every circuit head is live.

    Reads as the mapping of its ``to_dict()`` (``entry["maps_vs_patching"]["rho"]``).
    """

    maps_vs_patching: RankCorrelation
    circuit_under_maps: CircuitRankTest


@dataclass
class ReuseAnalysis(Result):
    """The overlap-and-reuse analysis (:func:`reuse_analysis`), shown alike by notebook 04 and the report.

    ``pairs["a|b"]``: :class:`TaskPair` (MAPS vs MAPS over the live heads, circuit vs circuit,
    |patching| vs |patching|); ``per_task[t]``: :class:`TaskAgreement` (MAPS vs |patching| and the
    circuit's heads under MAPS); ``reuse[c][t]``: :class:`CrossTaskAblation` of c's circuit on task t
    (:class:`ReuseMatrix`); ``table``: the one family of tests, Holm-corrected over its rows; ``apart``:
    random-draw rows kept out of the family because too few draws were made for their p to reach the
    corrected bar.
    """

    tasks: list[str]
    relations: dict[str, str]
    live_heads: list[str]
    circuits: dict[str, list[str]]
    pairs: dict[str, TaskPair]
    per_task: dict[str, TaskAgreement]
    reuse: ReuseMatrix
    table: TestTable
    apart: TestTable | None
    notes: list[str]


@dataclass(frozen=True)
class _Setting:
    """What every test of one :func:`reuse_analysis` shares."""

    live: list[Head]
    in_live: bool  # every circuit head is live: set tests draw from the live heads
    population: int  # heads the set tests draw from
    k: int  # top-k of the MAPS top-set test
    seed: int
    n_permutations: int

    @property
    def kw(self) -> dict[str, int]:
        return {"n_permutations": self.n_permutations, "seed": self.seed}


def _setting(model: HookedTransformer, circuits: dict[str, Circuit], n_permutations: int, seed: int,
             notes: list[str]) -> _Setting:
    """The live heads and the population of the set tests (a note when it is the live heads)."""
    n_total = model.cfg.n_layers * model.cfg.n_heads
    live = live_heads(model)
    # set tests draw from the live heads when every head involved is live (dead heads cannot be in a circuit)
    in_live = all(as_head_set(c) <= set(live) for c in circuits.values())
    if in_live and len(live) < n_total:
        notes.append(f"set overlaps and circuit AUROCs are tested within the {len(live)} live heads (every circuit "
                     "head is live)")
    return _Setting(live=live, in_live=in_live, population=len(live) if in_live else n_total,
                    k=default_top_k(len(live)), seed=seed, n_permutations=n_permutations)


def _compare_pair(a: str, b: str, relation_scores: dict[str, HeadScores], patching: dict[str, HeadScores],
                  circuits: dict[str, Circuit], relations: dict[str, str], s: _Setting) -> tuple[TaskPair, list[TestRow]]:
    """Tasks ``a`` and ``b``: circuit overlap, |patching| agreement and (two different relations) MAPS agreement."""
    pair = TaskPair(circuits=set_overlap(circuits[a], circuits[b], s.population),
                    patching=rank_correlation(patching[a], patching[b], heads=s.live, absolute=True, **s.kw))
    rows = [TestRow.from_result(f"circuits {a} vs {b}: shared heads", pair.circuits, statistic="size_intersection")]
    if pair.patching.p_value is not None:
        rows.append(TestRow.from_result(f"|patching| {a} vs {b}: Spearman (live heads)", pair.patching, statistic="rho"))
    if a in relations and b in relations and relations[a] != relations[b]:
        ra, rb = relation_scores[a], relation_scores[b]
        pair = dataclasses.replace(
            pair, maps=rank_correlation(ra, rb, heads=s.live, **s.kw),
            maps_top=set_overlap(_top_live(ra, s.k, s.live, s.seed), _top_live(rb, s.k, s.live, s.seed + 1), len(s.live)),
            maps_topk_curve=topk_overlap_curve(ra, rb, seed=s.seed))
        if pair.maps.p_value is not None:
            rows.append(TestRow.from_result(f"MAPS {relations[a]} vs {relations[b]}: Spearman (live heads)", pair.maps,
                                            statistic="rho"))
        rows.append(TestRow.from_result(f"MAPS {relations[a]} vs {relations[b]}: top-{s.k} heads shared", pair.maps_top,
                                        statistic="size_intersection"))
    return pair, rows


def _maps_vs_discovery(t: str, relation: str, scores: HeadScores, patching: HeadScores, circuit: Circuit,
                       s: _Setting) -> tuple[TaskAgreement, list[TestRow]]:
    """Task ``t``: its relation's MAPS scores against |patching| and against its circuit."""
    entry = TaskAgreement(
        maps_vs_patching=rank_correlation(scores, patching, heads=s.live, absolute=True, **s.kw),
        circuit_under_maps=circuit_rank_test(scores, circuit, heads=s.live if s.in_live else None, **s.kw))
    rows = []
    if entry.maps_vs_patching.p_value is not None:
        rows.append(TestRow.from_result(f"{t}: MAPS {relation} vs |patching|: Spearman (live heads)",
                                        entry.maps_vs_patching, statistic="rho"))
    if entry.circuit_under_maps.p_value is not None:
        rows.append(TestRow.from_result(f"{t}: circuit heads' MAPS {relation} scores: AUROC"
                                        + (" (live heads)" if s.in_live else ""),
                                        entry.circuit_under_maps, statistic="auroc"))
    return entry, rows


def _reuse_rows(reuse: ReuseMatrix, notes: list[str]) -> tuple[list[TestRow], list[TestRow]]:
    """Cross-task ablation rows: (those with enough draws for the family, those kept apart); a note for
    every cell without a test and for the rows kept apart."""
    rows = []
    for c in reuse.circuit_tasks:
        for t in reuse.measured_tasks:
            r = reuse.cell(c, t)
            if r.p_value is None:
                notes.append(f"remove {c} circuit -> {t}: not tested ({r.p_how})")
                continue
            rows.append(TestRow(f"remove {c} circuit -> {t}: normalised logit diff vs random sets", "normalised",
                                r.ablated["normalised"], r.p_value, r.p_how, r.n_random, 1 / (1 + r.n_random)))
    few = [r for r in rows if r.n < MIN_DRAWS_IN_FAMILY]
    if few:
        notes.append(f"{len(few)} cross-task ablation rows are kept apart from the family: fewer than "
                     f"{MIN_DRAWS_IN_FAMILY} random head sets were drawn (or exist: all of them were used), so their p "
                     "cannot go below 1/(n + 1); such rows are reported, not tested")
    return [r for r in rows if r.n >= MIN_DRAWS_IN_FAMILY], few


def reuse_analysis(
    model: HookedTransformer,
    relation_scores: dict[str, HeadScores],
    patching: dict[str, HeadScores],
    circuits: dict[str, Circuit],
    batches: dict[str, TaskBatch],
    *,
    n_random: int = MIN_DRAWS_IN_FAMILY,
    n_permutations: int = 20_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ReuseAnalysis:
    """Do the tasks' circuits share heads, do MAPS scores find them, and does removing one task's
    circuit hurt another task? One family of tests, Holm-corrected (:func:`circuitlib.overlap.test_table`).

    Per task (keys of ``circuits``): ``relation_scores[task]`` = MAPS static scores of the task's relation
    (tasks without one are left out of the MAPS rows), ``patching[task]`` = causal head scores (compared as
    |score|), ``circuits[task]``, ``batches[task]`` (prompts for the cross-task ablations).

    Rank statistics are taken over the **live heads** only (:func:`circuitlib.interventions.live_heads`):
    on the embedded model the switched-off heads tie at zero and would make any two scorings look alike
    ("alive vs dead"); on a pretrained model every head is live. Set tests draw from the live heads when
    every circuit head is live. Cross-task ablation: mean-ablation (:func:`cross_task_ablation`) against
    ``n_random`` random sets (:func:`circuitlib.interventions.control_sets`); with fewer than
    ``MIN_DRAWS_IN_FAMILY`` draws those rows go to ``apart`` instead of the family. Rows in the family come
    in this order: per pair of tasks (circuits, |patching|, MAPS Spearman, MAPS top-k), per task (MAPS vs
    |patching|, AUROC), then the cross-task ablations.
    """
    tasks = list(circuits)
    notes: list[str] = []
    setting = _setting(model, circuits, n_permutations, seed, notes)
    relations = {t: relation_scores[t].target for t in tasks if t in relation_scores}
    rows: list[TestRow] = []
    pairs: dict[str, TaskPair] = {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            pairs[f"{a}|{b}"], pair_rows = _compare_pair(a, b, relation_scores, patching, circuits, relations, setting)
            rows += pair_rows
    per_task: dict[str, TaskAgreement] = {}
    for t in tasks:
        if t not in relations:
            notes.append(f"{t}: no MAPS relation registered, left out of the MAPS rows")
            continue
        per_task[t], task_rows = _maps_vs_discovery(t, relations[t], relation_scores[t], patching[t], circuits[t], setting)
        rows += task_rows
    reuse = reuse_matrix(model, circuits, batches, n_random=n_random, seed=seed)
    in_family, apart = _reuse_rows(reuse, notes)
    return ReuseAnalysis(
        tasks=tasks, relations=relations, live_heads=[head_name(h) for h in setting.live],
        circuits={t: [head_name(h) for h in sorted(as_head_set(c))] for t, c in circuits.items()},
        pairs=pairs, per_task=per_task, reuse=reuse, table=test_table(rows + in_family, alpha=alpha),
        apart=test_table(apart, alpha=alpha) if apart else None, notes=notes)


PAPER_PAIR = ("ioi", "colored_objects")  # the two circuits Merullo et al. (2024, arXiv:2310.08744) compare


@dataclass(frozen=True, kw_only=True)
class PairReuse(MappingResult):
    """Two tasks' head sets side by side, as Merullo et al. (2024) compare IOI with Colored Objects: how
    many heads they share, what share of each head set that is, and what removing each one does to the
    other task (:func:`pair_reuse`).

    - ``shared``: the heads in both sets; ``share_of_a`` = ``|a & b| / |a|``, ``share_of_b`` =
      ``|a & b| / |b|`` (``None`` for an empty set); ``p_value``: hypergeometric, more shared heads than
      random sets of these sizes (:class:`~circuitlib.overlap.SetOverlap`);
    - ``remove_a_on_b`` / ``remove_b_on_a``: normalised logit difference of the other task with one head
      set mean-ablated (1 = untouched, 0 = as the corrupted prompts), ``random_*`` the mean over random
      live-head sets of the same size, ``n_random_*`` their number (``None`` where no cell was computed).
    """

    a: str
    b: str
    size_a: int
    size_b: int
    shared: list[str]
    share_of_a: float | None
    share_of_b: float | None
    p_value: float
    remove_a_on_b: float | None
    random_a_on_b: float | None
    n_random_a_on_b: int | None
    remove_b_on_a: float | None
    random_b_on_a: float | None
    n_random_b_on_a: int | None


def pair_reuse(analysis: ReuseAnalysis | Mapping[str, Any], a: str, b: str) -> PairReuse:
    """Tasks ``a`` and ``b`` of a :func:`reuse_analysis` result (or its ``to_dict()``, as the report stores
    it) as one :class:`PairReuse`. ``ValueError`` when the analysis did not compare them."""
    d = analysis.to_dict() if isinstance(analysis, Result) else analysis
    pairs = d.get("pairs", {})
    key, flipped = (f"{a}|{b}", False) if f"{a}|{b}" in pairs else (f"{b}|{a}", True)
    if key not in pairs:
        raise ValueError(f"the reuse analysis has no pair {a!r} / {b!r} (it compared {sorted(pairs)}): "
                         "run it with head sets of both tasks")
    ov = pairs[key]["circuits"]
    size_a, size_b = (ov["size_b"], ov["size_a"]) if flipped else (ov["size_a"], ov["size_b"])
    k = ov["size_intersection"]
    reuse = d.get("reuse", {})

    def cell(c: str, t: str) -> tuple[float | None, float | None, int | None]:
        x = reuse.get(c, {}).get(t)
        if not x:
            return None, None, None
        return x["ablated"]["normalised"], x["random_mean"].get("normalised") if x.get("n_random") else None, x["n_random"]

    ab, ba = cell(a, b), cell(b, a)
    return PairReuse(a=a, b=b, size_a=size_a, size_b=size_b, shared=list(ov["intersection"]),
                     share_of_a=k / size_a if size_a else None, share_of_b=k / size_b if size_b else None,
                     p_value=ov["p_value"], remove_a_on_b=ab[0], random_a_on_b=ab[1], n_random_a_on_b=ab[2],
                     remove_b_on_a=ba[0], random_b_on_a=ba[1], n_random_b_on_a=ba[2])
