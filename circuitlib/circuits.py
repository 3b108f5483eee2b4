"""Circuits from patching scores: selection, faithfulness under several ablation conventions,
minimality, and the discovery pipeline.

Conventions (they change numbers; every result names them):

- A circuit is evaluated by **ablating every head outside it** (:mod:`circuitlib.interventions`).
  Default: mean-ablation of ``hook_z`` at every position, means over all real tokens of the task's
  *corrupted* prompts (Wang et al.'s ABC dataset for IOI), BOS excluded. :data:`CONVENTIONS` adds BOS
  in the means, per-template means (position by position), resample ablation and zero-ablation.
- **faithfulness** = mean logit difference of the circuit / that of the full model (1 = the circuit
  alone recovers the full behaviour); ``normalised`` = (circuit - every head ablated) / (full - every
  head ablated). 95% intervals: percentile bootstrap over prompts (``n_boot`` resamples, seeded).
- **minimality** of a circuit head v = (circuit - circuit without v) / full, in logit difference.
- :func:`discover_circuit` scores heads on one set of prompts (*selection*), picks the smallest
  top-k reaching ``target`` there, and reports faithfulness on a disjoint *held-out* set under every
  convention. A head set is ``robust`` when it reaches the target on held-out prompts under at least
  two conventions; prose calls it "the circuit" only then.

Head-scoring methods live in a registry (:data:`HEAD_SCORERS`): :func:`register_scorer` adds one,
and discovery, the report and the explorer pick it up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch

from transformer_lens import HookedTransformer
from .interventions import CONVENTIONS, Ablation, head_masks, run_ablations
from .results import Result
from .types import Circuit, Head, HeadScores, TaskBatch, head_name


Direction = Literal["noising", "denoising"]


# ---------------------------------------------------------------------------------------------
# Head scorers


HEAD_SCORERS: dict[str, Callable[..., HeadScores]] = {}


def register_scorer(name: str, fn: Callable[..., HeadScores]) -> None:
    """Register a head-scoring method ``fn(model, batch, *, direction, progress) -> HeadScores``.

    A method that can score a subset of heads exactly takes a keyword ``candidates`` (a list of
    ``(layer, head)``; ``None`` = every head): :func:`discover_circuit` with a ``screen`` passes it the
    heads the attribution screen kept (the other heads then score 0 and ``meta`` lists the candidates).

    A method that has only one direction records it in ``HeadScores.meta["direction"]`` (path patching
    is always noising: ``discover_circuit(direction="denoising")`` still gives noising path patching,
    and its meta says so)."""
    if name in HEAD_SCORERS:
        raise ValueError(f"a head scorer named {name!r} is already registered")
    HEAD_SCORERS[name] = fn


def _act_patch(model: HookedTransformer, batch: TaskBatch, *, direction: Direction, progress: bool = False,
               candidates: list[Head] | None = None) -> HeadScores:
    from . import patching

    if candidates is not None:
        screened = screened_act_patch()
        if screened is not None:
            return screened(model, batch, direction=direction, progress=progress, candidates=candidates)
    return patching.act_patch_heads(model, batch, direction=direction, progress=progress)


def screened_act_patch() -> Callable[..., HeadScores] | None:
    """Screened exact activation patching from :mod:`circuitlib.patching` (``act_patch_screened``: an
    AtP*-style screen with GradDrop ranks every head, exact patching verifies the heads whose effect may
    reach :data:`SCREEN_MIN_FRACTION` of the largest, up to as many heads as the screen's size), or
    ``None`` if that module has none (discovery then patches every head). The returned scores are exact
    for verified heads and the screen's estimate elsewhere; ``meta["screened"]`` says which, why the
    search stopped and the bound on the unverified heads."""
    from . import patching

    if not hasattr(patching, "act_patch_screened"):
        return None

    def run(model, batch, *, direction, progress, candidates):
        res = patching.act_patch_screened(model, batch, direction=direction, min_fraction=SCREEN_MIN_FRACTION,
                                          max_verified=len(candidates))
        hs = res.scores
        hs.meta["screened"] = {"by": "circuitlib.patching.act_patch_screened (AtP* screen + GradDrop, exact "
                                     "verification)", "min_fraction": SCREEN_MIN_FRACTION,
                               "max_verified": len(candidates), "verified": [head_name(h) for h in res.verified_heads],
                               "stopped": res.stopped,
                               "bound": None if res.bound != res.bound else round(float(res.bound), 6),
                               "threshold": round(float(res.threshold), 6)}
        return hs
    return run


def _attribution(model: HookedTransformer, batch: TaskBatch, *, direction: Direction, progress: bool = False) -> HeadScores:
    from .patching import attribution_patch_heads

    return attribution_patch_heads(model, batch, direction=direction)


def _path_patch(model: HookedTransformer, batch: TaskBatch, *, direction: Direction, progress: bool = False,
                candidates: list[Head] | None = None) -> HeadScores:
    from .patching import path_patch

    return path_patch(model, batch, senders=candidates, progress=progress)


register_scorer("act_patch", _act_patch)
register_scorer("attribution", _attribution)
register_scorer("path_patch", _path_patch)


# ---------------------------------------------------------------------------------------------
# Selection


def select_circuit(
    scores: HeadScores, *, top_k: int | None = None, threshold: float | None = None, absolute: bool = True
) -> Circuit:
    """The heads with the ``top_k`` largest scores, or all heads with score >= ``threshold``.

    ``absolute=True`` ranks / thresholds ``|score|`` (heads that hurt the task count too).
    """
    if (top_k is None) == (threshold is None):
        raise ValueError("select_circuit needs exactly one of top_k= or threshold=")
    values = scores.scores.abs() if absolute else scores.scores
    if top_k is not None:
        if not 0 <= top_k <= values.numel():
            raise ValueError(f"top_k must be between 0 and {values.numel()} (the number of heads)")
        heads = scores.top(top_k, absolute=absolute)
        how = f"top {top_k} by {'|score|' if absolute else 'score'}"
    else:
        heads = [(int(l), int(h)) for l, h in (values >= threshold).nonzero()]
        how = f"{'|score|' if absolute else 'score'} >= {threshold}"
    meta = {"method": scores.method, **{k: scores.meta[k] for k in ("direction", "metric") if k in scores.meta}}
    return Circuit(frozenset(heads), task=scores.target, model=scores.model, how=f"{scores.method}: {how}", meta=meta)


# ---------------------------------------------------------------------------------------------
# Faithfulness and minimality


def _complement_masks(model: HookedTransformer, circuits: list[frozenset[Head]]) -> torch.Tensor:
    """Masks that ablate everything *outside* each circuit."""
    return ~head_masks(model, circuits)


@dataclass
class Faithfulness(Result):
    """How much of the full model's logit difference a circuit recovers with every other head ablated.

    ``faithfulness`` = circuit / full (mean logit differences); ``ci95``: its percentile bootstrap
    interval over prompts; ``normalised`` = (circuit - empty) / (full - empty); accuracies are two-way
    (answer beats wrong). ``ablation`` names the convention; ``prompts`` which prompts were used.
    """

    heads: list[str]
    faithfulness: float
    ci95: tuple[float, float]
    normalised: float
    logit_diff_full: float
    logit_diff_circuit: float
    logit_diff_empty: float
    accuracy_full: float
    accuracy_circuit: float
    accuracy_empty: float
    ablation: dict
    prompts: str
    n_prompts: int

    def reaches(self, target: float) -> bool:
        return self.faithfulness >= target


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    ratios = num[idx].mean(1) / den[idx].mean(1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return round(float(lo), 4), round(float(hi), 4)


def faithfulness(
    model: HookedTransformer,
    batch: TaskBatch,
    circuit: Circuit,
    *,
    ablation: Ablation = Ablation(),
    reference: TaskBatch | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    prompts: str = "",
) -> Faithfulness:
    """Faithfulness of ``circuit`` on ``batch`` with every other head ablated by ``ablation``
    (default: mean over the corrupted prompts, every position, BOS excluded). One batched run
    evaluates the full model, the circuit and the empty circuit."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    everything = frozenset((l, h) for l in range(L) for h in range(H))
    run = run_ablations(model, batch, _complement_masks(model, [everything, circuit.heads, frozenset()]),
                        ablation, reference=reference)
    d = run.logit_diff.double().numpy()
    full, circ, empty = d.mean(1)
    if abs(full) < 1e-9 or abs(full - empty) < 1e-9:
        raise ValueError("the full model's logit difference is 0 (or equals the fully ablated model's): "
                         "faithfulness is undefined; check the task batch")
    acc = run.accuracy.numpy()
    return Faithfulness(
        heads=circuit.names(), faithfulness=round(float(circ / full), 4),
        ci95=_bootstrap_ratio(d[1], d[0], n_boot, seed), normalised=round(float((circ - empty) / (full - empty)), 4),
        logit_diff_full=round(float(full), 4), logit_diff_circuit=round(float(circ), 4),
        logit_diff_empty=round(float(empty), 4), accuracy_full=round(float(acc[0]), 4),
        accuracy_circuit=round(float(acc[1]), 4), accuracy_empty=round(float(acc[2]), 4),
        ablation=ablation.to_dict(), prompts=prompts or f"{batch.task} ({len(batch)} prompts)", n_prompts=len(batch),
    )


def faithfulness_by_convention(
    model: HookedTransformer, batch: TaskBatch, circuit: Circuit, *,
    conventions: dict[str, Ablation] = CONVENTIONS, **kwargs,
) -> dict[str, Faithfulness]:
    """:func:`faithfulness` under each named ablation convention (default :data:`CONVENTIONS`)."""
    return {name: faithfulness(model, batch, circuit, ablation=a, **kwargs) for name, a in conventions.items()}


def minimality(
    model: HookedTransformer, batch: TaskBatch, circuit: Circuit, *, ablation: Ablation = Ablation()
) -> dict[str, float]:
    """For each circuit head v: (circuit - circuit without v) / full, in mean logit difference
    (one batched run)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads = sorted(circuit.heads)
    sets = [frozenset((l, h) for l in range(L) for h in range(H)), circuit.heads] + [circuit.heads - {v} for v in heads]
    d = run_ablations(model, batch, _complement_masks(model, sets), ablation).mean_logit_diff
    full, circ = float(d[0]), float(d[1])
    return {head_name(v): round((circ - float(x)) / full, 4) for v, x in zip(heads, d[2:])}


def k_grid(n_heads: int, dense_up_to: int = 40) -> list[int]:
    """The k at which a faithfulness curve is evaluated: every k up to ``dense_up_to``, then a
    geometric grid (x1.25) up to all heads. Between grid points :func:`smallest_k` bisects."""
    ks = list(range(min(n_heads, dense_up_to) + 1))
    k = float(ks[-1])
    while ks[-1] < n_heads:
        k *= 1.25
        ks.append(min(n_heads, int(round(k))))
    return sorted(set(ks))


#: Models with more heads than this get the big-model discovery defaults: a coarse, capped k grid
#: evaluated until the target is reached (:func:`coarse_k_grid`, :data:`BIG_K_CAP`) and exact patching
#: only on the heads a screen keeps (``screen=``, by default as many as the k cap).
BIG_MODEL_HEADS = 100
#: Largest k the big-model curve evaluates, as a fraction of all heads (gpt2-medium: 96 of 384). A head set
#: of more than a quarter of the model is no circuit the report would name; discovery then falls back to
#: the most faithful k evaluated and says ``reached_target: False``. ``discover_circuit(max_k=...)`` changes it.
BIG_K_CAP = 0.25
#: Screened activation patching verifies every head whose effect may reach this fraction of the largest one.
SCREEN_MIN_FRACTION = 0.05


def coarse_k_grid(n_heads: int, cap: int | None = None, ratio: float = 1.5) -> list[int]:
    """A coarse k grid for big models: 0, 1, 2, 3, 4, then x``ratio`` (rounded) up to ``cap`` (default
    ``BIG_K_CAP`` of the heads), with ``cap`` itself last. gpt2-medium: 0 1 2 3 4 6 9 14 21 32 48 72 96
    (13 points); :func:`smallest_k` bisects inside the gap before the first point reaching the target."""
    cap = max(1, int(round(BIG_K_CAP * n_heads))) if cap is None else int(cap)
    cap = min(cap, n_heads)
    ks = [k for k in range(5) if k <= cap]
    while ks[-1] < cap:
        ks.append(min(cap, max(ks[-1] + 1, int(round(ks[-1] * ratio)))))
    return ks


def faithfulness_curve(
    model: HookedTransformer, batch: TaskBatch, scores: HeadScores, *, ks: list[int] | None = None,
    absolute: bool = True, ablation: Ablation = Ablation(), full: float | None = None,
) -> dict[int, float]:
    """Faithfulness of the top-k circuit (by ``|score|``) for every k in ``ks`` (default
    :func:`k_grid`), one batched run. ``full``: the full model's mean logit difference under
    ``ablation`` when already known (saves one set per call); else it is computed in the same run."""
    n = scores.scores.numel()
    ks = k_grid(n) if ks is None else [int(k) for k in ks]
    order = scores.top(n, absolute=absolute)
    sets = ([] if full is not None else [frozenset(order)]) + [frozenset(order[:k]) for k in ks]
    d = run_ablations(model, batch, _complement_masks(model, sets), ablation).mean_logit_diff
    if full is None:
        full, d = float(d[0]), d[1:]
    return {k: round(float(x) / float(full), 4) for k, x in zip(ks, d)}


def full_logit_diff(model: HookedTransformer, batch: TaskBatch, ablation: Ablation = Ablation()) -> float:
    """The full model's mean logit difference as :func:`faithfulness_curve` measures it (no head ablated)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    everything = frozenset((l, h) for l in range(L) for h in range(H))
    return float(run_ablations(model, batch, _complement_masks(model, [everything]), ablation).mean_logit_diff[0])


def scan_curve(
    model: HookedTransformer, batch: TaskBatch, scores: HeadScores, ks: list[int], target: float, *,
    chunk: int = 4, absolute: bool = True, ablation: Ablation = Ablation(), progress: bool = False,
) -> tuple[dict[int, float], float]:
    """:func:`faithfulness_curve` over ascending ``ks``, ``chunk`` points per batched run, stopping after
    the first run in which a point reaches ``target`` (the points beyond it are not evaluated). The cost
    of a run grows with its number of head sets, so stopping early saves what the unused points would
    cost. Returns the curve and the full model's mean logit difference. Shows a progress bar (with ETA)
    over the grid when ``progress``."""
    from tqdm.auto import tqdm

    full = full_logit_diff(model, batch, ablation)
    if abs(full) < 1e-9:
        raise ValueError("the full model's logit difference is 0: faithfulness is undefined; check the task batch")
    ks = sorted(int(k) for k in ks)
    curve: dict[int, float] = {}
    with tqdm(total=len(ks), desc="  faithfulness curve", unit=" k", leave=False, disable=not progress,
              dynamic_ncols=True) as bar:
        for lo in range(0, len(ks), chunk):
            part = ks[lo:lo + chunk]
            curve.update(faithfulness_curve(model, batch, scores, ks=part, absolute=absolute, ablation=ablation,
                                            full=full))
            bar.update(len(part))
            if any(curve[k] >= target for k in part if k > 0):
                break
    return curve, full


def smallest_k(
    model: HookedTransformer, batch: TaskBatch, scores: HeadScores, curve: dict[int, float], target: float, *,
    absolute: bool = True, ablation: Ablation = Ablation(), full: float | None = None,
) -> int | None:
    """The smallest k > 0 whose top-k circuit reaches ``target``: the first grid point of ``curve``
    that does, refined by bisection inside the grid gap before it (assumes the curve rises within a
    gap; one ablated run of one head set per step). ``None`` when no k on the curve reaches it.
    ``full``: the full model's logit difference, if known (see :func:`faithfulness_curve`)."""
    ks = sorted(k for k in curve if k > 0)
    hit = next((k for k in ks if curve[k] >= target), None)
    if hit is None:
        return None
    lo = max([k for k in ks if k < hit], default=0)
    while hit - lo > 1:
        mid = (lo + hit) // 2
        f = faithfulness_curve(model, batch, scores, ks=[mid], absolute=absolute, ablation=ablation, full=full)[mid]
        curve[mid] = f
        lo, hit = (lo, mid) if f >= target else (mid, hit)
    return hit


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class CircuitDiscovery(Result):
    """Everything :func:`discover_circuit` found for one task.

    ``scores``: every registered scorer's head scores on the selection prompts; ``circuit``: the head
    set chosen from ``method``'s scores; ``selection``: its faithfulness on the selection prompts
    (default convention); ``heldout``: faithfulness on disjoint held-out prompts under every
    convention; ``robust``: conventions under which it reaches ``target`` on held-out prompts (the
    head set is called a circuit only with two or more); ``reached_target``: whether the chosen k
    reached the target on the selection prompts (False when discovery fell back to the most faithful
    k); ``curve``: faithfulness by k on the selection prompts.
    """

    task: str
    model: str
    scores: dict[str, HeadScores]
    circuit: Circuit
    selection: Faithfulness
    heldout: dict[str, Faithfulness]
    robust: list[str]
    reached_target: bool
    minimality: dict[str, float]
    curve: dict[int, float]
    timings: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_robust(self) -> bool:
        return len(self.robust) >= 2

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["scores"] = {k: v.to_dict() for k, v in self.scores.items()}
        out["circuit"] = self.circuit.to_dict()
        out["curve"] = {str(k): v for k, v in self.curve.items()}
        out["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return out


def split_prompts(task: str, tokenizer, n: int, *, seed: int = 0) -> tuple[TaskBatch, TaskBatch]:
    """Two disjoint batches (selection, held-out) from ``2n`` prompts built with one seed: the prompts
    of each template are shuffled (seeded) and dealt alternately to the two halves, so both halves
    hold every template (and, for IOI, both name orders); a held-out prompt whose text is also a
    selection prompt is dropped (tasks with few distinct held-out prompts, e.g. capitals, then give a
    smaller held-out half: ``CircuitDiscovery.meta["n_heldout"]`` says how many)."""
    import numpy as np

    from .tasks import task_batch

    both = task_batch(task, tokenizer, 2 * n, seed=seed)
    groups: dict[str, list[int]] = {}
    for i, tpl in enumerate(both.template or [str(i % 2) for i in range(len(both))]):
        groups.setdefault(tpl, []).append(i)
    rng = np.random.default_rng(seed)
    sel_idx, held_idx = [], []
    turn = 0
    for rows in groups.values():
        for r in rng.permutation(rows):
            (sel_idx if turn % 2 == 0 else held_idx).append(int(r))
            turn += 1
    sel = both[sorted(sel_idx)]
    seen = set(sel.prompts)
    held = both[[i for i in sorted(held_idx) if both.prompts[i] not in seen]]
    return sel, held


def discover_circuit(
    model: HookedTransformer,
    task: str,
    *,
    n_prompts: int = 64,
    method: str = "act_patch",
    direction: Direction = "noising",
    scorers: list[str] | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    target: float = 0.85,
    ablation: Ablation = Ablation(),
    conventions: dict[str, Ablation] = CONVENTIONS,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    screen: int | None | Literal["auto"] = "auto",
    max_k: int | None | Literal["auto"] = "auto",
    atp_screen: bool = False,
) -> CircuitDiscovery:
    """Head scores by every registered method, a circuit from ``method``'s scores, and its faithfulness.

    ``n_prompts`` selection prompts and as many held-out ones (:func:`split_prompts`). The circuit is
    chosen by ``top_k`` / ``threshold``; with neither, the smallest top-k whose faithfulness (under
    ``ablation``) reaches ``target`` on the selection prompts (:func:`smallest_k`; else the most
    faithful k evaluated, and ``reached_target`` is False). Held-out faithfulness under every convention.

    What is evaluated (defaults by model size; ``meta["k_grid"]`` and ``meta["screen"]`` record it):

    - ``max_k``: ``None`` evaluates the faithfulness curve on :func:`k_grid` (every k up to 40, then x1.25,
      up to all heads) in one batched run: the default on models with at most :data:`BIG_MODEL_HEADS`
      heads. An int (the ``"auto"`` default above that: :data:`BIG_K_CAP` of the heads, 96 on gpt2-medium)
      evaluates :func:`coarse_k_grid` up to it, 4 points per run, stopping at the first run reaching
      ``target`` (:func:`scan_curve`), then bisects; a head set of more than ``max_k`` heads is not sought.
    - ``screen``: ``None`` runs every method on every head. An int N: activation patching runs exactly
      on every head (cheap: about one forward from the head's layer on, per head) and **path patching**
      (and any registered method taking ``candidates``; its cost is per sender) runs only on the N heads
      with the largest |activation patching| effect (other heads score 0 there). ``"auto"``: N = the k cap
      on models with more than :data:`BIG_MODEL_HEADS` heads (96 on gpt2-medium), ``None`` otherwise. A
      head outside the top N by activation patching gets no path-patching score.
    - ``atp_screen=True`` (with a ``screen``): rank by attribution patching instead, and screen activation
      patching itself with :func:`circuitlib.patching.act_patch_screened` (AtP*-style screen with GradDrop;
      heads whose effect may reach :data:`SCREEN_MIN_FRACTION` of the largest are patched exactly, at most
      N; the others keep the screen's estimate; ``meta["screened"]`` of its scores says which and why it
      stopped); the curve is then capped at N. Off by default: on a random gpt2-medium (top 10, 4 prompts)
      it took about a third of the time of exact patching of every head (benchmarks/bench_patching.py,
      2026-11-30), not yet the 15% asked before it becomes the default (there the ten largest heads sit in
      layer 0: the caches plus exact patches of just those ten already cost 0.11 of that time). A
      screen can miss a head (a linear estimate can be far off, e.g. for heads whose effect saturates); a
      missed head cannot enter the circuit.
    """
    names = _check_methods(method, scorers, direction)
    n_all = model.cfg.n_layers * model.cfg.n_heads
    big = n_all > BIG_MODEL_HEADS
    if max_k == "auto":
        max_k = max(1, int(round(BIG_K_CAP * n_all))) if big else None
    if screen == "auto":
        screen = max_k if big else None
    if screen is not None and not 1 <= int(screen) <= n_all:
        raise ValueError(f"screen must be between 1 and {n_all} heads (or None: patch every head exactly)")
    sel, held = split_prompts(task, model.tokenizer, n_prompts, seed=seed)
    scores, timings, candidates, screen_meta = _screen(model, sel, names, screen, direction=direction,
                                                      progress=progress, atp_screen=atp_screen)
    if candidates is not None and method in screen_meta["exact_on_candidates"] and (max_k is None or max_k > len(candidates)):
        max_k = len(candidates)  # a head outside the candidates has no score to enter the circuit with
    _score_heads(model, sel, names, scores, timings, candidates, direction=direction, progress=progress)
    chosen = scores[method]
    t0 = time.perf_counter()
    top_k, curve, grid_meta, reached = _choose_k(model, sel, chosen, max_k, target, top_k=top_k, threshold=threshold,
                                                 ablation=ablation, progress=progress)
    circuit = select_circuit(chosen, top_k=top_k, threshold=threshold)
    selection = faithfulness(model, sel, circuit, ablation=ablation, n_boot=n_boot, seed=seed,
                             prompts=f"{task} selection prompts ({len(sel)})")
    reached = reached and selection.reaches(target)
    timings["faithfulness"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    heldout = faithfulness_by_convention(model, held, circuit, conventions=conventions, n_boot=n_boot, seed=seed,
                                         prompts=f"{task} held-out prompts ({len(held)})")
    mini = minimality(model, held, circuit, ablation=ablation)
    timings["heldout"] = time.perf_counter() - t0
    meta = {"n_selection": len(sel), "n_heldout": len(held), "seed": seed, "method": method,
            "direction": direction, "target": target, "top_k": top_k, "threshold": threshold,
            "ablation": ablation.to_dict(), "k_grid": grid_meta, "screen": screen_meta, **sel.meta}
    return CircuitDiscovery(
        task=task, model=model.cfg.model_name or "", scores=scores, circuit=circuit, selection=selection,
        heldout=heldout, robust=[n for n, f in heldout.items() if f.reaches(target)], reached_target=reached,
        minimality=mini, curve=curve, timings=timings, meta=meta)


def _check_methods(method: str, scorers: list[str] | None, direction: str) -> list[str]:
    """The scorers to run (``method`` among them); unknown names or directions fail before any work."""
    names = list(HEAD_SCORERS) if scorers is None else list(scorers)
    unknown = [n for n in [method, *names] if n not in HEAD_SCORERS]
    if unknown:
        raise ValueError(f"unknown head-scoring method {unknown[0]!r}: use one of {tuple(HEAD_SCORERS)} "
                         "(or register_scorer a new one)")
    if method not in names:
        names.append(method)
    if direction not in ("noising", "denoising"):
        raise ValueError(f"unknown direction {direction!r}: use 'noising' or 'denoising'")
    return names


def _takes_candidates(name: str) -> bool:
    import inspect

    return "candidates" in inspect.signature(HEAD_SCORERS[name]).parameters


def _screen(model: HookedTransformer, sel: TaskBatch, names: list[str], screen: int | None, *, direction: Direction,
            progress: bool, atp_screen: bool) -> tuple[dict[str, HeadScores], dict[str, float], list[Head] | None, dict]:
    """The screen of :func:`discover_circuit` (its docstring): with ``screen`` N, rank every head by exact
    activation patching (or attribution patching with ``atp_screen``) and keep the top N as candidates for
    the scorers that take ``candidates``. Returns (scores so far, timings, candidates or None, meta)."""
    scores: dict[str, HeadScores] = {}
    timings: dict[str, float] = {}
    if screen is None:
        return scores, timings, None, {"n_candidates": None, "note": "every head patched exactly (screen=None)"}
    # Exact activation patching of every head costs about one forward per head from the head's layer on
    # (minutes on gpt2-medium); the per-sender methods (path patching) run on its top N.
    by = "attribution" if atp_screen or "act_patch" not in HEAD_SCORERS else "act_patch"
    t0 = time.perf_counter()
    ranking = HEAD_SCORERS[by](model, sel, direction=direction, progress=progress)
    timings[by] = time.perf_counter() - t0
    if by in names:
        scores[by] = ranking
    candidates = sorted(ranking.top(int(screen), absolute=True))
    screened = [n for n in names if n not in scores and _takes_candidates(n)
                and (n != "act_patch" or screened_act_patch() is not None)]
    what = ("activation patching by patching.act_patch_screened (its own AtP* screen, at most "
            f"{len(candidates)} heads patched exactly, estimates elsewhere), other methods"
            if "act_patch" in screened else "activation patching of every head exactly; "
            + (", ".join(screened) or "no other method"))
    meta = {"n_candidates": len(candidates), "by": f"|{by}| on the selection prompts",
            "candidates": [head_name(h) for h in candidates], "exact_on_candidates": screened,
            "note": f"{what} exactly on the top {len(candidates)} heads by |{by}| only (0 elsewhere)"}
    return scores, timings, candidates, meta


def _score_heads(model: HookedTransformer, sel: TaskBatch, names: list[str], scores: dict[str, HeadScores],
                 timings: dict[str, float], candidates: list[Head] | None, *, direction: Direction,
                 progress: bool) -> None:
    """Every scorer in ``names`` not yet in ``scores`` runs on the selection prompts (on ``candidates`` only
    where it takes them); fills ``scores`` and ``timings``."""
    for name in names:
        if name in scores:
            continue
        t0 = time.perf_counter()
        fn = HEAD_SCORERS[name]
        if candidates is not None and _takes_candidates(name):
            scores[name] = fn(model, sel, direction=direction, progress=progress, candidates=candidates)
        else:
            scores[name] = fn(model, sel, direction=direction, progress=progress)
        timings[name] = time.perf_counter() - t0


def _choose_k(model: HookedTransformer, sel: TaskBatch, chosen: HeadScores, max_k: int | None, target: float, *,
              top_k: int | None, threshold: float | None, ablation: Ablation,
              progress: bool) -> tuple[int | None, dict[int, float], dict, bool]:
    """The faithfulness curve (every k of :func:`k_grid`, or a coarse grid up to ``max_k`` scanned until the
    target) and, without ``top_k`` / ``threshold``, the smallest k reaching ``target`` (else the most
    faithful k evaluated, and reached = False). Returns (top_k, curve, grid meta, reached)."""
    n_all = model.cfg.n_layers * model.cfg.n_heads
    if max_k is None:
        ks = k_grid(n_all)
        curve = faithfulness_curve(model, sel, chosen, ablation=ablation)
        full = None
        grid_meta = {"grid": "k_grid: every k up to 40, then x1.25 up to all heads", "max_k": n_all}
    else:
        ks = coarse_k_grid(n_all, cap=int(max_k))
        curve, full = scan_curve(model, sel, chosen, ks, target, ablation=ablation, progress=progress)
        grid_meta = {"grid": "coarse_k_grid (0-4, then x1.5), 4 points per run until one reaches the target",
                     "max_k": int(max_k), "evaluated": sorted(curve)}
    reached = True
    if top_k is None and threshold is None:
        top_k = smallest_k(model, sel, chosen, curve, target, ablation=ablation, full=full)
        if top_k is None:
            reached = False
            top_k = max(curve, key=curve.get)
    grid_meta["bisected"] = sorted(set(curve) - set(ks))
    return top_k, curve, grid_meta, reached
