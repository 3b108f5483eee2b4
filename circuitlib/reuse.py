"""Reuse of circuit components across tasks: ablate one task's circuit (or core) and measure another
task, against random head sets; and the whole overlap-and-reuse analysis (notebook 04, the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from transformer_lens import HookedTransformer
from .interventions import Ablation, control_sets, live_heads, run_ablations
from .overlap import (
    HeadSet,
    TestRow,
    TestTable,
    as_head_set,
    circuit_rank_test,
    default_top_k,
    empirical_p,
    rank_correlation,
    set_overlap,
    test_table,
    top_set,
    topk_overlap_curve,
)
from .results import Result
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
    clean: dict
    corrupt_logit_diff: float
    ablated: dict
    random_how: str
    n_random: int
    exhaustive: bool
    random_mean: dict
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


def reuse_matrix(
    model: HookedTransformer, circuits: dict[str, HeadSet], batches: dict[str, TaskBatch], **kwargs
) -> dict[str, dict[str, CrossTaskAblation]]:
    """:func:`cross_task_ablation` for every (ablated circuit, measured task) pair.

    ``result[circuit_task][measured_task]``; the diagonal is each circuit's own task (a positive
    control: removing a task's circuit should hurt that task). Off the diagonal, random sets also
    exclude the measured task's own circuit.
    """
    return {
        c: {t: cross_task_ablation(model, circuit, batch, exclude=circuits.get(t, ()) if t != c else (), **kwargs)
            for t, batch in batches.items()}
        for c, circuit in circuits.items()
    }


MIN_DRAWS_IN_FAMILY = 2000


@dataclass
class ReuseAnalysis(Result):
    """The overlap-and-reuse analysis (:func:`reuse_analysis`), shown alike by notebook 04 and the report.

    ``pairs["a|b"]``: MAPS vs MAPS (:class:`~circuitlib.overlap.Comparison` over the live heads), circuit
    vs circuit (set overlap), |patching| vs |patching|; ``per_task[t]``: MAPS vs |patching| and the
    circuit's heads under MAPS; ``reuse[c][t]``: :class:`CrossTaskAblation` of c's circuit on task t;
    ``table``: the one family of tests, Holm-corrected over its rows; ``apart``: random-draw rows kept
    out of the family because too few draws were made for their p to reach the corrected bar.
    """

    tasks: list[str]
    relations: dict[str, str]
    live_heads: list[str]
    circuits: dict[str, list[str]]
    pairs: dict[str, dict]
    per_task: dict[str, dict]
    reuse: dict[str, dict[str, CrossTaskAblation]]
    table: TestTable
    apart: TestTable | None
    notes: list[str]


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
    ("alive vs dead"); on a pretrained model every head is live. Cross-task ablation: mean-ablation
    (:func:`cross_task_ablation`) against ``n_random`` random sets (:func:`circuitlib.interventions.control_sets`); with fewer
    than ``MIN_DRAWS_IN_FAMILY`` draws those rows go to ``apart`` instead of the family.
    """
    tasks = list(circuits)
    n_total = model.cfg.n_layers * model.cfg.n_heads
    live = live_heads(model)
    kw = dict(n_permutations=n_permutations, seed=seed)
    rows: list[TestRow] = []
    notes: list[str] = []
    pairs: dict[str, dict] = {}
    per_task: dict[str, dict] = {}
    relations = {t: relation_scores[t].target for t in tasks if t in relation_scores}
    k = default_top_k(len(live))
    live_set = set(live)
    # set tests draw from the live heads when every head involved is live (dead heads cannot be in a circuit)
    in_live = all(as_head_set(c) <= live_set for c in circuits.values())
    population = len(live) if in_live else n_total
    if in_live and len(live) < n_total:
        notes.append(f"set overlaps and circuit AUROCs are tested within the {len(live)} live heads (every circuit "
                     "head is live)")
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            pair: dict[str, Any] = {
                "circuits": set_overlap(circuits[a], circuits[b], population),
                "patching": rank_correlation(patching[a], patching[b], heads=live, absolute=True, **kw),
            }
            rows.append(TestRow.from_result(f"circuits {a} vs {b}: shared heads", pair["circuits"],
                                            statistic="size_intersection"))
            if pair["patching"]["p_value"] is not None:
                rows.append(TestRow.from_result(f"|patching| {a} vs {b}: Spearman (live heads)", pair["patching"],
                                                statistic="rho"))
            if a in relations and b in relations and relations[a] != relations[b]:
                ra, rb = relation_scores[a], relation_scores[b]
                pair["maps"] = rank_correlation(ra, rb, heads=live, **kw)
                pair["maps_top"] = set_overlap(_top_live(ra, k, live, seed), _top_live(rb, k, live, seed + 1), len(live))
                pair["maps_topk_curve"] = topk_overlap_curve(ra, rb, seed=seed)
                if pair["maps"]["p_value"] is not None:
                    rows.append(TestRow.from_result(f"MAPS {relations[a]} vs {relations[b]}: Spearman (live heads)",
                                                    pair["maps"], statistic="rho"))
                rows.append(TestRow.from_result(f"MAPS {relations[a]} vs {relations[b]}: top-{k} heads shared",
                                                pair["maps_top"], statistic="size_intersection"))
            pairs[f"{a}|{b}"] = pair
    for t in tasks:
        if t not in relations:
            notes.append(f"{t}: no MAPS relation registered, left out of the MAPS rows")
            continue
        entry = {"maps_vs_patching": rank_correlation(relation_scores[t], patching[t], heads=live, absolute=True, **kw),
                 "circuit_under_maps": circuit_rank_test(relation_scores[t], circuits[t],
                                                         heads=live if in_live else None, **kw)}
        per_task[t] = entry
        if entry["maps_vs_patching"]["p_value"] is not None:
            rows.append(TestRow.from_result(f"{t}: MAPS {relations[t]} vs |patching|: Spearman (live heads)",
                                            entry["maps_vs_patching"], statistic="rho"))
        if entry["circuit_under_maps"]["p_value"] is not None:
            rows.append(TestRow.from_result(f"{t}: circuit heads' MAPS {relations[t]} scores: AUROC"
                                            + (" (live heads)" if in_live else ""),
                                            entry["circuit_under_maps"], statistic="auroc"))
    reuse = reuse_matrix(model, circuits, batches, n_random=n_random, seed=seed)
    draws_rows = []
    for c in tasks:
        for t in tasks:
            r = reuse[c][t]
            if r.p_value is None:
                notes.append(f"remove {c} circuit -> {t}: not tested ({r.p_how})")
                continue
            draws_rows.append(TestRow(f"remove {c} circuit -> {t}: normalised logit diff vs random sets", "normalised",
                                      r.ablated["normalised"], r.p_value, r.p_how, r.n_random, 1 / (1 + r.n_random)))
    few = [r for r in draws_rows if r.n < MIN_DRAWS_IN_FAMILY]
    rows += [r for r in draws_rows if r.n >= MIN_DRAWS_IN_FAMILY]
    apart = test_table(few, alpha=alpha) if few else None
    if few:
        notes.append(f"{len(few)} cross-task ablation rows are kept apart from the family: fewer than "
                     f"{MIN_DRAWS_IN_FAMILY} random head sets were drawn (or exist: all of them were used), so their p "
                     "cannot go below 1/(n + 1); such rows are reported, not tested")
    return ReuseAnalysis(
        tasks=tasks, relations=relations, live_heads=[head_name(h) for h in live],
        circuits={t: [head_name(h) for h in sorted(as_head_set(c_))] for t, c_ in circuits.items()},
        pairs=pairs, per_task=per_task, reuse=reuse, table=test_table(rows, alpha=alpha), apart=apart, notes=notes)
