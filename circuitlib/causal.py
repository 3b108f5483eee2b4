"""Causal experiments on head sets: MAPS's causal check and top-k vs random-k ablation.

**MAPS's causal check** (:func:`causal_check`) follows experiment 2 of Elhelo & Geva 2024 as the
authors' code runs it:

- prompts: the relation's own MAPS template filled with every single-token source
  (:mod:`circuitlib.tasks.maps_prompts`); when the tokenizer cannot spell the template (the embedded
  model), the task registered as standing in for the relation (``copying`` for ``name_copying``);
- heads: the relation's top heads by static score, **only heads with score > 0**, at most ``m``
  (MAPS's rule by model size, :func:`maps_m`: 30 below 300 heads, 50 below 500 — gpt2-medium —, 100
  below 1000, 150 below 1500, else 250; on models so small that this exceeds a quarter of their heads,
  gpt2-medium's ratio 50/384 instead: 3 on the embedded model, :func:`default_m`), ties in the
  authors' order (higher layer*n_heads+head first);
- ablation: **zero-ablation of hook_z at the last position**, heads ablated cumulatively (curve
  index ``i`` = the first ``i`` heads ablated; index 0 = clean);
- metric: **top-1 accuracy** (the vocabulary argmax equals the target token);
- baselines: ``n_random`` (5) draws of as many heads from all heads except the relation's, ablated
  cumulatively on the same prompts; **control**: the relation's heads ablated on *other* relations'
  prompts, up to 5 relations whose top heads share < 15% with the relation's and whose clean top-1
  accuracy is within 0.2 of the relation's (candidates in seeded random order).

circuitlib's extras, named as such in every result: the two-way accuracy (answer beats another pair's
target) and the logit difference next to top-1 accuracy; ``extra_tasks`` (the relation's heads
ablated on other tasks, e.g. IOI: not MAPS's control); and a random baseline from
:func:`circuitlib.interventions.control_sets` (layer-matched live heads where the layers allow) with
many draws and an empirical p-value.

**Top vs random** (:func:`top_vs_random`): a task's top heads ablated against random sets of as many
heads from :func:`circuitlib.interventions.control_sets` (all such sets when there are few).

Results: :class:`CausalCheck` (its curves :class:`Curve`), :func:`causal_curves` a :class:`CausalCurves`
(reads as legend label -> values for :func:`circuitlib.plots.curve_plot`), :class:`TopVsRandom`.
Every ablation goes through :mod:`circuitlib.interventions`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from jaxtyping import Real

from transformer_lens import HookedTransformer
from .interventions import (
    Ablation,
    AblationRun,
    HeadSetDraws,
    control_sets,
    live_heads,
    run_ablations,
    sample_head_sets,
)
from .overlap import binomial_p
from .results import Result
from .types import Head, HeadScores, TaskBatch, head_name


MAPS_ABLATION = Ablation(kind="zero", positions="end")
METRICS = ("top1_accuracy", "accuracy", "logit_diff")


def maps_m(n_heads_total: int) -> int:
    """MAPS's maximum number of heads ablated, by the model's total number of heads."""
    for bound, m in ((300, 30), (500, 50), (1000, 100), (1500, 150)):
        if n_heads_total < bound:
            return m
    return 250


def default_m(n_heads_total: int) -> int:
    """:func:`maps_m`, unless that is more than a quarter of the model's heads (models far smaller than
    MAPS's: the embedded model's 24 heads would get 30, leaving nothing to draw random heads from);
    then gpt2-medium's ratio, 50 of 384 heads (3 on the embedded model)."""
    m = maps_m(n_heads_total)
    return m if m <= n_heads_total // 4 else max(1, round(n_heads_total * 50 / 384))


def m_rule(n_heads_total: int) -> str:
    if maps_m(n_heads_total) <= n_heads_total // 4:
        return f"MAPS's rule for {n_heads_total} heads"
    return (f"MAPS's rule would ablate {maps_m(n_heads_total)} of {n_heads_total} heads; circuitlib uses "
            "gpt2-medium's ratio of 50 in 384 instead")


def relation_heads(scores: HeadScores, m: int) -> list[Head]:
    """The top-``m`` heads by static score with score > 0, best first; ties in the MAPS authors' order
    (a stable ascending sort reversed: the higher flat index ``layer * n_heads + head`` first)."""
    flat = scores.scores.flatten().numpy()
    order = np.argsort(flat, kind="stable")[::-1][:m]
    return [(int(i) // scores.n_heads, int(i) % scores.n_heads) for i in order if flat[i] > 0]


def relation_prompts(model: HookedTransformer, relation: str, *, n: int | None = None, seed: int = 0) -> TaskBatch:
    """MAPS's prompts for ``relation`` on this model, or the registered stand-in task (see module docstring)."""
    from .tasks import TASK_SPECS, task_batch
    from .tasks.maps_prompts import relation_prompt_batch, template_fits

    if template_fits(model.tokenizer, relation):
        from .scoring import dynamic_bos

        return relation_prompt_batch(relation, model.tokenizer, bos=dynamic_bos(model)[0], n=n, seed=seed,
                                     model_name=model.cfg.model_name or "")
    stand_in = [s.name for s in TASK_SPECS.values() if s.stands_in_for == relation]
    if not stand_in:
        raise ValueError(f"no prompts for {relation!r} on this model: its tokenizer cannot spell the MAPS template "
                         "and no registered task stands in for it (TaskSpec.stands_in_for)")
    batch = task_batch(stand_in[0], model.tokenizer, n or 64, seed=seed)
    batch.meta["source"] = f"task {stand_in[0]!r} (the MAPS template is not in this model's vocabulary)"
    return batch


@dataclass
class Curve(Result):
    """Metrics at END as heads are ablated cumulatively: entry ``i`` = the first ``i`` of ``heads`` ablated."""

    heads: list[str]
    top1_accuracy: list[float]
    accuracy: list[float]
    logit_diff: list[float]


@dataclass
class CausalCheck(Result):
    """The result of :func:`causal_check` (MAPS experiment 2 plus circuitlib's named extras).

    ``top``: the relation's heads on its own prompts; ``random``: the paper's random baseline draws and
    their mean; ``controls``: the paper's control (relation heads on other relations' prompts), keyed by
    relation; ``control_candidates``: every relation considered and why it was kept or not;
    ``extra_tasks``: relation heads on other tasks (circuitlib's extra); ``extra_random``: layer-matched
    live-head draws at ``m`` with an empirical p (circuitlib's extra; ``n_draws`` 0 and ``p_value`` None,
    ``how`` / ``note`` saying why, when too few live heads remain); ``summary``: values at ``m``, and
    ``random_heads_live_fraction``: the share of MAPS's random heads that are live (on a model with
    switched-off heads, a random baseline of mostly dead heads ablates almost nothing).
    """

    relation: str
    model: str
    prompts: str
    n_prompts: int
    m: int
    m_rule: str
    ablation: dict
    top: Curve
    random: list[Curve]
    random_mean: dict[str, list[float]]
    controls: dict[str, Curve]
    control_candidates: list[dict]
    extra_tasks: dict[str, Curve]
    extra_random: dict
    summary: dict = field(default_factory=dict)


def _curves(run: AblationRun, orders: Sequence[Sequence[Head]], n: int) -> list[Curve]:
    out = []
    for j, order in enumerate(orders):
        sl = slice(j * n, (j + 1) * n)
        out.append(Curve(heads=[head_name(h) for h in order],
                         top1_accuracy=[round(float(v), 4) for v in run.top1_accuracy[sl]],
                         accuracy=[round(float(v), 4) for v in run.accuracy[sl]],
                         logit_diff=[round(float(v), 4) for v in run.mean_logit_diff[sl]]))
    return out


def _cumulative(model: HookedTransformer, batch: TaskBatch, orders: Sequence[Sequence[Head]], m: int, ablation: Ablation) -> list[Curve]:
    """Each order ablated cumulatively (0..m heads) on ``batch``, all in one batched run."""
    sets = [list(order[:i]) for order in orders for i in range(m + 1)]
    return _curves(run_ablations(model, batch, sets, ablation), orders, m + 1)


def causal_check(
    model: HookedTransformer,
    relation: str,
    *,
    scores: dict[str, HeadScores] | None = None,
    m: int | None = None,
    n_random: int = 5,
    max_controls: int = 5,
    max_shared: float = 0.15,
    max_accuracy_gap: float = 0.2,
    extra_tasks: Iterable[str] = (),
    n_extra_random: int = 200,
    n_prompts: int | None = None,
    seed: int = 0,
) -> CausalCheck:
    """MAPS's causal check for ``relation`` (module docstring: prompts, heads, ablation, metric, baselines).

    ``scores``: static scores by relation (must include ``relation``; the others are control
    candidates); default: every relation valid for the tokenizer. ``m``: default :func:`default_m`
    (:func:`maps_m` unless too large for the model); fewer heads when fewer have a score > 0.
    ``n_prompts``: prompts per relation (default all pairs, as MAPS). Seeded throughout (the authors'
    code draws random heads and control order unseeded): one generator from ``seed`` draws MAPS's random
    heads, then orders the control candidates. Curve values are rounded to 4 decimals.
    """
    from .tasks import task_batch

    n_total = model.cfg.n_layers * model.cfg.n_heads
    scores = _static_scores(model, relation, scores)
    m_max = default_m(n_total) if m is None else m
    heads = relation_heads(scores[relation], m_max)
    if not heads:
        raise ValueError(f"no head has a static {relation} score above 0: MAPS's causal check has nothing to ablate")
    batch = relation_prompts(model, relation, n=n_prompts, seed=seed)
    rng = np.random.default_rng(seed)
    draws = _maps_random_heads(model, heads, n_random, rng)
    curves = _cumulative(model, batch, [heads] + draws, len(heads), MAPS_ABLATION)
    top, rand = curves[0], curves[1:]
    rand_mean = _mean_curve(rand)
    candidates, controls = _controls(model, relation, heads, scores, top.top1_accuracy[0], rng, n_prompts=n_prompts,
                                     seed=seed, max_controls=max_controls, max_shared=max_shared,
                                     max_accuracy_gap=max_accuracy_gap)
    extra = {t: _cumulative(model, task_batch(t, model.tokenizer, n_prompts or 64, seed=seed), [heads], len(heads),
                            MAPS_ABLATION)[0] for t in extra_tasks}
    result = CausalCheck(
        relation=relation, model=model.cfg.model_name or "", prompts=batch.meta.get("source", batch.task),
        n_prompts=len(batch), m=len(heads),
        m_rule=f"heads with static score > 0, at most {m_max} ({m_rule(n_total)})" if m is None
        else f"heads with static score > 0, at most {m_max} (given)",
        ablation=MAPS_ABLATION.to_dict(), top=top, random=rand, random_mean=rand_mean, controls=controls,
        control_candidates=candidates, extra_tasks=extra,
        extra_random=_live_random_baseline(model, batch, heads, top.top1_accuracy[-1], n_extra_random, seed))
    result.summary = _summary(top, rand_mean, controls, _live_fraction(model, draws))
    return result


def _static_scores(model: HookedTransformer, relation: str, scores: dict[str, HeadScores] | None) -> dict[str, HeadScores]:
    """``scores``, or static scores of every relation valid for the tokenizer plus ``relation``."""
    from .scoring import static_scores_many
    from .tasks import relation_table

    if scores is None:
        valid = [r["relation"] for r in relation_table(model.tokenizer) if r["valid"]]
        scores = static_scores_many(model, sorted(set(valid) | {relation}))
    if relation not in scores:
        raise ValueError(f"scores has no entry for {relation!r}: include its static scores")
    return scores


def _maps_random_heads(model: HookedTransformer, heads: Sequence[Head], n_random: int,
                       rng: np.random.Generator) -> list[list[Head]]:
    """MAPS's random baseline: ``n_random`` draws of ``len(heads)`` heads from every head outside ``heads``
    (dead heads included, as the paper draws them)."""
    others = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in heads]
    if len(others) < len(heads):
        raise ValueError(f"m={len(heads)} relation heads leave {len(others)} other heads: MAPS's random baseline draws "
                         f"m heads outside the relation's, so m can be at most half the heads; pass a smaller m")
    return [[others[i] for i in rng.choice(len(others), size=len(heads), replace=False)] for _ in range(n_random)]


def _live_fraction(model: HookedTransformer, draws: Sequence[Sequence[Head]]) -> float | None:
    """The share of the drawn heads that are live (``None`` without draws)."""
    live = set(live_heads(model))
    return float(np.mean([h in live for d in draws for h in d])) if draws else None


def _mean_curve(curves: Sequence[Curve]) -> dict[str, list[float]]:
    """Per metric, the mean over ``curves`` at every number of heads ablated (``{}`` without curves)."""
    if not curves:
        return {}
    return {k: [round(float(np.mean([getattr(c, k)[i] for c in curves])), 4) for i in range(len(curves[0].heads) + 1)]
            for k in METRICS}


def _controls(model: HookedTransformer, relation: str, heads: Sequence[Head], scores: dict[str, HeadScores],
              clean_top1: float, rng: np.random.Generator, *, n_prompts: int | None, seed: int, max_controls: int,
              max_shared: float, max_accuracy_gap: float) -> tuple[list[dict], dict[str, Curve]]:
    """The paper's control: the relation's heads ablated on other relations' prompts.

    Candidates (every other relation in ``scores``) in ``rng``'s random order; one is accepted when it
    has prompts, its top ``len(heads)`` heads share < ``max_shared`` of ``heads``, its clean top-1
    accuracy is within ``max_accuracy_gap`` of ``clean_top1``, and fewer than ``max_controls`` were
    accepted before. Returns every candidate with its reason, and the accepted ones' curves."""
    candidates, controls = [], {}
    names = [r for r in scores if r != relation]
    for r in [names[i] for i in rng.permutation(len(names))]:
        entry: dict = {"relation": r}
        try:
            other_batch = relation_prompts(model, r, n=n_prompts, seed=seed)
        except ValueError as exc:
            candidates.append({**entry, "accepted": False, "reason": str(exc)})
            continue
        theirs = relation_heads(scores[r], len(heads))
        shared = len(set(heads) & set(theirs)) / len(heads)
        clean = _cumulative(model, other_batch, [[]], 0, MAPS_ABLATION)[0].top1_accuracy[0]
        entry.update(shared=round(shared, 4), clean_top1_accuracy=clean, prompts=other_batch.meta.get("source", ""))
        if shared >= max_shared:
            entry.update(accepted=False, reason=f"shares {shared:.0%} of the relation's heads (must be < {max_shared:.0%})")
        elif abs(clean - clean_top1) >= max_accuracy_gap:
            entry.update(accepted=False, reason=f"clean top-1 accuracy {clean:.2f} vs {clean_top1:.2f} "
                                               f"(must be within {max_accuracy_gap})")
        elif len(controls) >= max_controls:
            entry.update(accepted=False, reason=f"{max_controls} controls already")
        else:
            entry.update(accepted=True, reason="")
            controls[r] = _cumulative(model, other_batch, [heads], len(heads), MAPS_ABLATION)[0]
        candidates.append(entry)
    return candidates, controls


def _live_random_baseline(model: HookedTransformer, batch: TaskBatch, heads: Sequence[Head], observed_top1: float,
                          n_draws: int, seed: int) -> dict:
    """circuitlib's extra baseline: all ``len(heads)`` heads ablated at once vs layer-matched draws from the
    live heads (:func:`circuitlib.interventions.control_sets`), with an empirical p; no test (``p_value``
    None, ``note`` saying why) when too few live heads remain, never dead-head controls."""
    matched = control_sets(model, heads, n_draws, seed=seed)
    if not len(matched):
        return {"n_draws": 0, "how": matched.how, "note": matched.how, "p_value": None}
    run = run_ablations(model, batch, matched.sets, MAPS_ABLATION)
    top1 = run.top1_accuracy.numpy()
    return {"how": matched.how, "n_draws": len(matched), "exhaustive": matched.exhaustive,
            "top1_accuracy_mean": round(float(top1.mean()), 4),
            "accuracy_mean": round(float(run.accuracy.mean()), 4),
            "p_value": _at_least_as_harmful(observed_top1, top1),
            "p_value_is": "(1 + #draws whose top-1 accuracy at m is <= the relation heads') / (1 + n)"}


def _summary(top: Curve, rand_mean: dict[str, list[float]], controls: dict[str, Curve],
             live_fraction: float | None) -> dict:
    """The values at m (and clean) that tables quote."""
    return {
        "m": len(top.heads),
        **{f"clean_{k}": getattr(top, k)[0] for k in METRICS},
        **{f"top_{k}": getattr(top, k)[-1] for k in METRICS},
        **{f"random_{k}": rand_mean[k][-1] for k in METRICS if rand_mean},
        "control_top1_accuracy": {r: (c.top1_accuracy[0], c.top1_accuracy[-1]) for r, c in controls.items()},
        "random_heads_live_fraction": None if live_fraction is None else round(live_fraction, 4),
    }


def _at_least_as_harmful(observed: float, draws: Real[np.ndarray, " n"]) -> float:
    """(1 + #random sets whose metric is <= the tested set's) / (1 + n): lower metric = more harm
    (:func:`circuitlib.overlap.empirical_p`; exact when every possible set was drawn)."""
    from .overlap import empirical_p

    return empirical_p(observed, draws, alternative="less").p_value


@dataclass(frozen=True)
class CausalCurves(Result, Mapping):
    """The curves of one :func:`causal_check` in one metric (:func:`causal_curves`).

    Fields: ``relation``, ``metric``; ``top``: the relation's heads on its own prompts; ``random``: MAPS's
    random draws, one curve each; ``controls`` / ``extra_tasks``: the relation's heads on a control
    relation's / an extra task's prompts, by name. Entry ``i`` of a curve = the first ``i`` heads ablated.

    Reads as the mapping *legend label -> values* that :func:`circuitlib.plots.curve_plot` takes
    (``"top capital heads"``, ``"random heads (MAPS baseline)"`` (a ``[draws, m + 1]`` list, drawn as mean
    and band), ``"on ... prompts (control)"``, ``"on ... prompts (extra)"``); ``to_dict()`` gives the fields.
    """

    relation: str
    metric: str
    top: list[float]
    random: list[list[float]]
    controls: dict[str, list[float]]
    extra_tasks: dict[str, list[float]]

    def labelled(self) -> dict[str, list[float] | list[list[float]]]:
        """The curves by legend label, in drawing order."""
        from .plots import pretty_name
        from .tasks import TASK_SPECS

        curves: dict[str, list[float] | list[list[float]]] = {f"top {pretty_name(self.relation).lower()} heads": self.top}
        if self.random:
            curves["random heads (MAPS baseline)"] = self.random
        for name, values in self.controls.items():
            curves[f"on {pretty_name(name).lower()} prompts (control)"] = values
        for name, values in self.extra_tasks.items():
            title = TASK_SPECS[name].title if name in TASK_SPECS else name
            curves[f"on {title} prompts (extra)"] = values
        return curves

    def __getitem__(self, label: str) -> list[float] | list[list[float]]:
        return self.labelled()[label]

    def __iter__(self) -> Iterator[str]:
        return iter(self.labelled())

    def __len__(self) -> int:
        return len(self.labelled())


def causal_curves(result: CausalCheck, metric: str = "top1_accuracy") -> CausalCurves:
    """Curves of a :func:`causal_check` in ``metric`` (``"top1_accuracy"``, ``"accuracy"`` (two-way) or
    ``"logit_diff"``) for :func:`circuitlib.plots.curve_plot`: the relation's heads, the random draws,
    each control and each extra task (:class:`CausalCurves`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: a causal check has {', '.join(METRICS)}")
    return CausalCurves(relation=result.relation, metric=metric, top=list(getattr(result.top, metric)),
                        random=[list(getattr(c, metric)) for c in result.random],
                        controls={k: list(getattr(c, metric)) for k, c in result.controls.items()},
                        extra_tasks={k: list(getattr(c, metric)) for k, c in result.extra_tasks.items()})


# ---------------------------------------------------------------------------------------------
# Top vs random


@dataclass
class TopVsRandom(Result):
    """A task's top heads ablated vs random sets of as many heads (:func:`top_vs_random`).

    ``clean`` / ``top``: accuracy (two-way, chance 0.5), top-1 accuracy and logit difference with
    nothing / the top heads ablated; ``random_mean``: their means over the random sets;
    ``drop_top`` / ``drop_random``: clean minus ablated (accuracy and top-1 accuracy);
    ``p_random_as_harmful``: (1 + #random sets whose top-1 drop is at least the top heads') / (1 + n); ``binomial_p_above_chance``:
    one-sided exact binomial p that the two-way accuracy after ablating the top heads is above 0.5.
    Random sets hold live heads only; when too few live heads remain for one set, ``n_random`` is 0,
    ``random_mean`` / ``drop_random`` are empty, ``p_random_as_harmful`` is None and ``random_how`` says why.
    """

    task: str
    heads: list[str]
    ablation: dict
    random_how: str
    n_random: int
    exhaustive: bool
    clean: dict[str, float]
    top: dict[str, float]
    random_mean: dict[str, float]
    drop_top: dict[str, float]
    drop_random: dict[str, float]
    p_random_as_harmful: float | None
    binomial_p_above_chance: float
    n_prompts: int


def top_vs_random(
    model: HookedTransformer,
    batch: TaskBatch,
    top: Sequence[Head],
    *,
    n_draws: int = 2000,
    pool: Iterable[Head] | None = None,
    ablation: Ablation = Ablation(),
    seed: int = 0,
) -> TopVsRandom:
    """Ablate ``top`` vs random sets of ``len(top)`` heads outside ``top``: from the live heads of ``pool``
    if given, else :func:`circuitlib.interventions.control_sets` (live heads, layer-matched where the layers allow);
    every such set when there are at most ``n_draws``, else ``n_draws`` seeded draws.
    Default ablation: mean over the corrupted prompts, every position, BOS excluded."""
    top = [(int(l), int(h)) for l, h in top]
    if pool is None:
        draws = control_sets(model, top, n_draws, seed=seed)
    else:
        try:
            draws = sample_head_sets(model, n_draws, size=len(top), pool=pool, exclude=top, seed=seed)
        except ValueError as exc:  # too few live heads in the pool: no random sets, no p-value
            draws = HeadSetDraws([], [], f"no control sets: {exc}", meta={"no_test": str(exc)})
    run = run_ablations(model, batch, [[], top, *draws.sets], ablation)
    acc, top1, ld = run.accuracy.numpy(), run.top1_accuracy.numpy(), run.mean_logit_diff.numpy()

    def at(i):
        return {"accuracy": round(float(acc[i]), 4), "top1_accuracy": round(float(top1[i]), 4),
                "logit_diff": round(float(ld[i]), 4)}

    rand = slice(2, None)
    has_random = len(draws) > 0
    n_correct = int((run.logit_diff[1] > 0).sum())
    return TopVsRandom(
        task=batch.task, heads=[head_name(h) for h in top], ablation=ablation.to_dict(), random_how=draws.how,
        n_random=len(draws), exhaustive=draws.exhaustive, clean=at(0), top=at(1),
        random_mean={"accuracy": round(float(acc[rand].mean()), 4), "top1_accuracy": round(float(top1[rand].mean()), 4),
                     "logit_diff": round(float(ld[rand].mean()), 4)} if has_random else {},
        drop_top={"accuracy": round(float(acc[0] - acc[1]), 4), "top1_accuracy": round(float(top1[0] - top1[1]), 4)},
        drop_random={"accuracy": round(float(acc[0] - acc[rand].mean()), 4),
                     "top1_accuracy": round(float(top1[0] - top1[rand].mean()), 4)} if has_random else {},
        p_random_as_harmful=_at_least_as_harmful(float(top1[1]), top1[rand]) if len(draws) else None,
        binomial_p_above_chance=float(binomial_p(n_correct, len(batch))),
        n_prompts=len(batch),
    )
