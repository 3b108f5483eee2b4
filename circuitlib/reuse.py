"""Reuse of circuit components across tasks: ablate one task's circuit (or core) and measure another
task, against random head sets; and the whole overlap-and-reuse analysis (notebook 04, the report).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .overlap import HeadSet, as_head_set, compare
from .types import Circuit, HeadScores, TaskBatch, head_name



@torch.no_grad()
def cross_task_ablation(
    model,
    circuit: HeadSet,
    batch: TaskBatch,
    *,
    kind: str = "mean",
    at: str = "all",
    n_random: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Remove ``circuit``'s heads and measure ``batch``'s task; compare with random head sets.

    Ablation: ``kind`` ("mean" = each head's mean z over ``batch.corrupt``, "zero") at ``at``
    ("all" positions by default, since circuit heads of another task may act before END; "end" =
    END only), all sets in batched forward passes (:func:`circuitlib.ablation.ablation_curves`).
    Random sets have the circuit's size and are drawn (seeded) from the heads *outside* the circuit
    (from all heads when the circuit holds more than half of them; ``random_pool`` says which: then
    random sets share many heads with the circuit and the comparison is weak; ablate a circuit's
    core, its top heads, instead).
    Metrics at END: accuracy (answer beats wrong), logit difference, and normalised logit
    difference (1 = clean, 0 = corrupted).
    ``empirical_p`` = (1 + #{random draws at least as harmful}) / (1 + n_random) (so never below
    1 / (1 + n_random)); ``z_score`` = (circuit - random mean) / random std of the normalised logit
    difference (negative: the circuit hurts more than random heads).
    """
    from .ablation import ablation_curves
    from .metrics import logit_diff, normalise

    heads = sorted(as_head_set(circuit))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    everything = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    for head in heads:
        if head not in everything:
            raise ValueError(f"head {head_name(head)} does not exist in a {n_layers}x{n_heads} model")
    outside = [hd for hd in everything if hd not in set(heads)]
    pool = outside if len(outside) >= len(heads) else everything
    rng = np.random.default_rng(seed)
    draws = [[pool[i] for i in sorted(rng.choice(len(pool), size=len(heads), replace=False))]
             for _ in range(n_random)]
    curves = ablation_curves(model, batch, [[], heads, *draws], kind=kind, at=at)
    ld_corrupt = float(logit_diff(model(batch.corrupt.to(model.cfg.device)), batch))
    ld_clean = curves["logit_diff"][0]

    def entry(i: int) -> dict[str, float]:
        ld = curves["logit_diff"][i]
        return {"accuracy": curves["accuracy"][i], "logit_diff": ld,
                "normalised": float(normalise(ld, ld_clean, ld_corrupt))}

    ablated = entry(1)
    random = [{"heads": [head_name(h) for h in d], **entry(2 + j)} for j, d in enumerate(draws)]
    rand_norm = np.array([d["normalised"] for d in random])
    rand_acc = np.array([d["accuracy"] for d in random])
    return {
        "circuit": [head_name(h) for h in heads],
        "circuit_task": circuit.task if isinstance(circuit, Circuit) else None,
        "measured_task": batch.task,
        "kind": kind,
        "at": at,
        "mean_over": "measured task's corrupted prompts" if kind == "mean" else None,
        "n_prompts": len(batch),
        "clean": entry(0),
        "corrupt_logit_diff": ld_corrupt,
        "ablated": ablated,
        "random": {
            "n_draws": n_random,
            "random_pool": "outside the circuit" if pool is outside else "all heads (circuit > half the model)",
            "accuracy_mean": float(rand_acc.mean()) if random else None,
            "accuracy_std": float(rand_acc.std()) if random else None,
            "normalised_mean": float(rand_norm.mean()) if random else None,
            "normalised_std": float(rand_norm.std()) if random else None,
            "draws": random,
        },
        "empirical_p": float((1 + (rand_norm <= ablated["normalised"]).sum()) / (1 + n_random)),
        "z_score": float((ablated["normalised"] - rand_norm.mean()) / rand_norm.std())
        if n_random > 1 and rand_norm.std() > 0 else None,
    }


def reuse_matrix(
    model, circuits: dict[str, HeadSet], batches: dict[str, TaskBatch], **kwargs
) -> dict[str, dict[str, Any]]:
    """:func:`cross_task_ablation` for every (ablated circuit, measured task) pair.

    ``result[circuit_task][measured_task]``; the diagonal is each circuit's own task (a positive
    control: removing a task's circuit should hurt that task).
    """
    return {
        c: {t: cross_task_ablation(model, circuit, batch, **kwargs) for t, batch in batches.items()}
        for c, circuit in circuits.items()
    }


def default_core_size(n_total: int, circuit_size: int) -> int:
    """A circuit's core: its top heads, at most a quarter of the model (toy: 6 of 24 heads)."""
    return max(1, min(circuit_size, max(3, n_total // 4)))


def reuse_analysis(
    model,
    relation_scores: dict[str, HeadScores],
    patching: dict[str, HeadScores],
    circuits: dict[str, Circuit],
    batches: dict[str, TaskBatch],
    *,
    core_size: int | None = None,
    n_random: int = 30,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole overlap-and-reuse analysis of notebook 04 as one JSON-able dict (for the report).

    Per task (keys of ``circuits``): ``relation_scores[task]`` = MAPS scores of the task's relation,
    ``patching[task]`` = causal head scores, ``circuits[task]`` its circuit, ``batches[task]`` the
    prompts for cross-task ablation. The *core* of a circuit = its ``core_size`` heads with the
    largest |patching| score (default :func:`default_core_size`). Returns, for every pair of tasks
    ``"a|b"``: MAPS vs MAPS, circuits vs circuits, cores vs cores, |patching| vs |patching|; per
    task MAPS vs |patching| / circuit / core; the reuse matrix of core ablations; and ``p_values``,
    a flat list ``{"test", "value", "p"}`` of the headline tests.
    """
    tasks = list(circuits)
    n_total = model.cfg.n_layers * model.cfg.n_heads
    size = core_size or min(default_core_size(n_total, len(circuits[t])) for t in tasks)
    cores = {t: Circuit.of(patching[t].top(size, absolute=True), t, circuits[t].model,
                           how=f"core: top {size} by |{patching[t].method}|") for t in tasks}
    kw = dict(n_permutations=n_permutations, seed=seed)
    out: dict[str, Any] = {"n_heads": n_total, "core_size": size,
                           "cores": {t: c.names() for t, c in cores.items()}, "pairs": {}, "per_task": {}}
    tests: list[dict[str, Any]] = []

    def test(name: str, value, p) -> None:
        tests.append({"test": name, "value": value, "p": p})

    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            pair = {
                "maps": compare(relation_scores[a], relation_scores[b], **kw),
                "circuits": compare(circuits[a], circuits[b], n_total=n_total)["set"],
                "cores": compare(cores[a], cores[b], n_total=n_total)["set"],
                "patching": compare(patching[a], patching[b], absolute=True, **kw),
            }
            out["pairs"][f"{a}|{b}"] = pair
            m, pt = pair["maps"], pair["patching"]
            test(f"MAPS {a} vs {b}: Spearman (all heads)", m["rank"]["rho"], m["rank"]["p_value"])
            test(f"MAPS {a} vs {b}: Spearman (within layers)", m["rank"]["rho"], m["rank_within_layers"]["p_value"])
            test(f"MAPS {a} vs {b}: top-{m['top_k']} shared", m["set"]["size_intersection"], m["set"]["p_value"])
            test(f"circuits {a} vs {b}: shared heads", pair["circuits"]["size_intersection"], pair["circuits"]["p_value"])
            test(f"cores {a} vs {b}: shared heads", pair["cores"]["size_intersection"], pair["cores"]["p_value"])
            test(f"|patching| {a} vs {b}: Spearman (within layers)", pt["rank"]["rho"], pt["rank_within_layers"]["p_value"])
    for t in tasks:
        entry = {
            "maps_vs_patching": compare(relation_scores[t], patching[t], absolute=True, **kw),
            "maps_vs_circuit": compare(relation_scores[t], circuits[t], seed=seed),
            "maps_vs_core": compare(relation_scores[t], cores[t], seed=seed),
        }
        out["per_task"][t] = entry
        r = entry["maps_vs_patching"]
        test(f"{t}: MAPS vs |patching| Spearman (within layers)", r["rank"]["rho"], r["rank_within_layers"]["p_value"])
        rt = entry["maps_vs_core"]["rank_test"]
        test(f"{t}: core heads' MAPS AUROC", rt["auroc"], rt["p_value"])
    out["reuse"] = reuse_matrix(model, cores, batches, n_random=n_random, seed=seed)
    for c in tasks:
        for t in tasks:
            r = out["reuse"][c][t]
            test(f"remove {c} core -> {t}: normalised logit diff", r["ablated"]["normalised"], r["empirical_p"])
    out["p_values"] = tests
    return out
