"""Causal experiments on head sets: MAPS's causal check (ablate a relation's top heads vs random and
control heads) and top-k vs random-k ablation drops.

Every ablation here goes through :mod:`circuitlib.interventions`.
"""

from __future__ import annotations

from typing import Iterable

from .scoring import static_scores_many
from .types import Head, HeadScores, TaskBatch, head_name


TASK_OF_RELATION = {"country_to_capital_wikidata": "capitals", "name_copying": "copying"}


def control_relations(
    relation: str, scores: dict[str, HeadScores], *, m: int, n: int = 2, max_shared: float = 0.25
) -> list[str]:
    """Up to ``n`` other relations in ``scores`` whose top-``m`` heads overlap least with
    ``relation``'s, sharing at most ``max_shared * m`` of them (a control must barely overlap; none
    may qualify, e.g. on the embedded model, where both valid relations have the same top heads)."""
    mine = set(scores[relation].top(m))
    shared = {r: len(mine & set(scores[r].top(m))) for r in scores if r != relation}
    ok = [r for r in shared if shared[r] <= max_shared * m]
    return sorted(ok, key=lambda r: (shared[r], r))[:n]


def causal_check(
    model,
    relation: str,
    *,
    m_max: int | None = None,
    n_random: int = 5,
    kind: str = "zero",
    controls: Iterable[str] | None = None,
    batch=None,
    n_prompts: int = 64,
    seed: int = 0,
    scores: dict[str, HeadScores] | None = None,
) -> dict:
    """Cumulatively ablate the top-``m`` heads by static score (m = 0..m_max) at each prompt's last
    position and track task accuracy, against ``n_random`` draws of random heads (never the top
    ``m_max`` relation heads) and against the top heads of control relations.

    Task: :data:`TASK_OF_RELATION` (country_to_capital_wikidata -> capitals, held-out prompts;
    name_copying -> copying, a list of names said twice), or ``batch`` (e.g. IOI). ``kind``:
    ``"zero"`` (MAPS) or ``"mean"`` (mean z over the task's corrupted prompts at END). Accuracy =
    answer logit beats the wrong answer's (capitals: the capital vs the corrupt country's capital;
    copying: the list's last name vs the corrupt prompt's name); top-1 accuracy and the mean logit
    difference are reported too; ``summary`` holds the values at ``m = m_max``.
    ``scores``: precomputed static scores by relation name (must include ``relation``; other
    entries are control candidates). Returns a JSON-able dict.
    """
    import random

    from .ablation import ablation_curves
    from .tasks import task_batch
    from .tasks.relations import relation_table

    if batch is None:
        if relation not in TASK_OF_RELATION:
            raise ValueError(
                f"no task for relation {relation!r}: pass batch=... (a TaskBatch) or use one of "
                f"{sorted(TASK_OF_RELATION)}"
            )
        batch = task_batch(TASK_OF_RELATION[relation], model.tokenizer, n_prompts, seed=seed)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    m_max = m_max or max(1, min(10, n_heads // 4))
    if scores is None:
        valid = [r["relation"] for r in relation_table(model.tokenizer) if r["valid"]]
        scores = static_scores_many(model, sorted(set(valid) | {relation}))
    ranked = scores[relation].top(m_max)
    if controls is None:
        controls = control_relations(relation, scores, m=m_max)
    controls = list(controls)
    rng = random.Random(seed)
    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in ranked]
    draws = [rng.sample(pool, min(m_max, len(pool))) for _ in range(n_random)]
    orders = [ranked] + draws + [scores[c].top(m_max) for c in controls]
    sets = [order[:m] for order in orders for m in range(m_max + 1)]
    curves = ablation_curves(model, batch, sets, kind=kind)
    n = m_max + 1

    def part(i):
        return {key: vals[i * n : (i + 1) * n] for key, vals in curves.items()}

    top = part(0)
    rand = [part(1 + j) for j in range(len(draws))]
    rand_mean = {key: [sum(r[key][m] for r in rand) / len(rand) for m in range(n)] for key in top}
    result = {
        "relation": relation,
        "task": batch.task,
        "n_prompts": len(batch),
        "ablation": {"kind": kind, "position": "END (last token)",
                     "mean_over": "task's corrupted prompts at END" if kind == "mean" else None},
        "m": list(range(n)),
        "top": {"heads": [head_name(h) for h in ranked], **top},
        "random": {"n_draws": len(draws), "excluded": "the top-m_max relation heads",
                   "heads": [[head_name(h) for h in d] for d in draws],
                   "draws": rand, "mean": rand_mean},
        "controls": {c: {"heads": [head_name(h) for h in scores[c].top(m_max)],
                         "shared_with_top": len(set(ranked) & set(scores[c].top(m_max))),
                         **part(1 + len(draws) + i)}
                     for i, c in enumerate(controls)},
    }
    result["summary"] = {"m": m_max}
    for metric in ("accuracy", "logit_diff"):
        result["summary"].update({
            f"clean_{metric}": top[metric][0],
            f"top_{metric}": top[metric][-1],
            f"random_{metric}": rand_mean[metric][-1],
            f"control_{metric}": {c: result["controls"][c][metric][-1] for c in controls},
        })
    return result


def causal_curves(result: dict, metric: str = "accuracy") -> dict:
    """The curves of a :func:`causal_check` result for :func:`circuitlib.plots.curve_plot`:
    ``{"top-m heads": [...], "random heads": [[draw] ...], "<control> heads": [...]}``."""
    curves = {f"top {_short(result['relation'])} heads": result["top"][metric]}
    curves["random heads"] = [d[metric] for d in result["random"]["draws"]]
    for name, c in result["controls"].items():
        curves[f"top {_short(name)} heads (control)"] = c[metric]
    return curves


def _short(relation: str) -> str:
    return {"country_to_capital_wikidata": "country->capital", "name_copying": "name-copying"}.get(relation, relation)




def top_vs_random(
    model,
    batch: TaskBatch,
    top: list[Head],
    *,
    n_draws: int = 30,
    seed: int = 0,
    kind: AblationKind = "mean",
    at: Where = "all",
) -> dict:
    """Accuracy drops when ablating ``top`` vs ``n_draws`` random sets of as many heads (any head).

    Returns ``{metric: {"clean", "top", "drop_top", "drop_random"}}`` for ``accuracy`` (answer beats
    the wrong answer: a two-way choice, so chance is 0.5 and a drop of 0.5 from 1.0 means "to chance")
    and ``top1_accuracy`` (answer is the argmax over the vocabulary); ``drop_random`` is the mean
    drop over the draws. Defaults: mean-ablation at every position, means over ``batch.corrupt``.
    """
    import random

    from .ablation import ablation_curves

    rng = random.Random(seed)
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    draws = [rng.sample(heads, len(top)) for _ in range(n_draws)]
    curves = ablation_curves(model, batch, [[], list(top), *draws], kind=kind, at=at)
    out = {"heads": [head_name(h) for h in top], "kind": kind, "at": at, "n_draws": n_draws}
    for metric in ("accuracy", "top1_accuracy"):
        acc = curves[metric]
        out[metric] = {"clean": acc[0], "top": acc[1], "drop_top": acc[0] - acc[1],
                       "drop_random": sum(acc[0] - a for a in acc[2:]) / n_draws}
    return out
