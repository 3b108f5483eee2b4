"""Circuits from patching scores: selection, faithfulness, minimality, and the whole discovery pipeline.

Conventions (they change numbers; every result names them):

- A circuit is evaluated by **mean-ablating every head outside it**: the head's z (``hook_z``) is
  replaced, at every position, by its mean over all real tokens of a *reference* dataset (default:
  the task's corrupted prompts, i.e. Wang et al.'s ABC dataset for IOI).
- **faithfulness** = logit difference of the circuit / logit difference of the full model (the
  issue's definition; 1 = the circuit alone recovers the full behaviour). Also reported:
  ``normalised`` = (circuit - all heads ablated) / (full - all heads ablated).
- **minimality** of a circuit head v = (circuit logit diff - logit diff of the circuit without v) /
  full-model logit diff: how much faithfulness drops when v is also ablated.

Many circuits are evaluated in one forward pass: copy ``i`` of the prompts gets its own set of
ablated heads (:func:`ablate_copies`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .ablation import head_means
from .types import Circuit, Head, HeadScores, TaskBatch, head_name

Reference = Literal["corrupt", "clean"] | TaskBatch
MAX_TOKENS = 32768  # token rows per forward when evaluating many circuits at once


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
# Ablation of many head sets at once


@contextmanager
def ablate_copies(
    model,
    ablated: Bool[Tensor, "copies n_layers n_heads"],
    means: Float[Tensor, "n_layers n_heads d_head"],
) -> Iterator[None]:
    """Forward passes on ``copies x batch`` rows (copy-major) mean-ablate, in copy ``c``, the heads
    where ``ablated[c]`` is True (at every position). Hooks are removed on every exit path."""
    C = ablated.shape[0]

    def make_hook(layer: int):
        mask = ablated[:, layer].to(model.cfg.device)  # [copy, head]

        def hook(z, hook):
            zc = z.reshape(C, -1, *z.shape[1:])  # [copy, batch, pos, head, d]
            out = torch.where(mask[:, None, None, :, None], means[layer].to(z), zc)
            return out.reshape(z.shape)

        return hook

    layers = [l for l in range(model.cfg.n_layers) if ablated[:, l].any()]
    with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", make_hook(l)) for l in layers]):
        yield


def _reference_means(model, batch: TaskBatch, reference: Reference) -> tuple[Tensor, str]:
    if isinstance(reference, TaskBatch):
        return head_means(model, reference.clean, reference.end, at="all"), f"{reference.task} prompts (given)"
    if reference == "corrupt":
        return head_means(model, batch.corrupt, batch.end, at="all"), f"{batch.task} corrupted prompts"
    if reference == "clean":
        return head_means(model, batch.clean, batch.end, at="all"), f"{batch.task} clean prompts"
    raise ValueError(f"unknown reference {reference!r}: use 'corrupt', 'clean' or a TaskBatch")


@torch.no_grad()
def _ablated_metrics(
    model, batch: TaskBatch, ablated: Bool[Tensor, "copies n_layers n_heads"], means: Tensor
) -> tuple[Tensor, Tensor]:
    """Logit difference and accuracy of the clean prompts with each copy's heads ablated."""
    B, S = batch.clean.shape
    size = max(1, MAX_TOKENS // (B * S))
    diffs, accs = [], []
    for i in range(0, ablated.shape[0], size):
        part = ablated[i : i + size]
        C = part.shape[0]
        with ablate_copies(model, part, means):
            logits = model(batch.clean.to(model.cfg.device).repeat(C, 1))
        rows = torch.arange(C * B)
        last = logits[rows, batch.end.repeat(C).to(logits.device)]
        d = (last[rows, batch.answer.repeat(C)] - last[rows, batch.wrong.repeat(C)]).view(C, B)
        diffs.append(d.mean(1))
        accs.append((d > 0).float().mean(1))
    return torch.cat(diffs).cpu(), torch.cat(accs).cpu()


def _outside(model, circuits: list[frozenset[Head]]) -> Tensor:
    mask = torch.ones(len(circuits), model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    for i, heads in enumerate(circuits):
        for l, h in heads:
            if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
                raise ValueError(f"head {l}.{h} does not exist in a {model.cfg.n_layers}x{model.cfg.n_heads} model")
            mask[i, l, h] = False
    return mask


# ---------------------------------------------------------------------------------------------
# Faithfulness and minimality


def faithfulness(
    model, batch: TaskBatch, circuit: Circuit, *, kind: Literal["mean"] = "mean", reference: Reference = "corrupt"
) -> dict[str, Any]:
    """How much of the full model's logit difference the circuit alone recovers.

    Every head outside ``circuit`` is mean-ablated (means over ``reference``, all positions).
    Returns ``faithfulness`` (circuit / full), ``normalised`` ((circuit - empty) / (full - empty)),
    the logit differences and accuracies of the full model, the circuit and the empty circuit,
    and what was ablated over which dataset.
    """
    if kind != "mean":
        raise ValueError("faithfulness supports kind='mean' (mean-ablation over a reference dataset)")
    means, ref_name = _reference_means(model, batch, reference)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    full, empty = frozenset((l, h) for l in range(L) for h in range(H)), frozenset()
    diffs, accs = _ablated_metrics(model, batch, _outside(model, [full, circuit.heads, empty]), means)
    d_full, d_circ, d_empty = (float(x) for x in diffs)
    return {
        "faithfulness": round(d_circ / d_full, 4),
        "normalised": round((d_circ - d_empty) / (d_full - d_empty), 4),
        "logit_diff_full": round(d_full, 4),
        "logit_diff_circuit": round(d_circ, 4),
        "logit_diff_empty": round(d_empty, 4),
        "accuracy_full": round(float(accs[0]), 4),
        "accuracy_circuit": round(float(accs[1]), 4),
        "accuracy_empty": round(float(accs[2]), 4),
        "n_heads": len(circuit),
        "heads": circuit.names(),
        "ablation": f"{kind}-ablation of every head outside the circuit (hook_z, all positions)",
        "reference": f"means over all real tokens of the {ref_name}",
        "n_prompts": len(batch),
    }


def minimality(
    model, batch: TaskBatch, circuit: Circuit, *, reference: Reference = "corrupt"
) -> dict[str, float]:
    """For each circuit head: the drop in faithfulness when it is ablated too (one batched forward)."""
    means, _ = _reference_means(model, batch, reference)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads = sorted(circuit.heads)
    sets = [frozenset((l, h) for l in range(L) for h in range(H)), circuit.heads]
    sets += [circuit.heads - {v} for v in heads]
    diffs, _ = _ablated_metrics(model, batch, _outside(model, sets), means)
    d_full, d_circ = float(diffs[0]), float(diffs[1])
    return {head_name(v): round((d_circ - float(d)) / d_full, 4) for v, d in zip(heads, diffs[2:])}


def faithfulness_curve(
    model, batch: TaskBatch, scores: HeadScores, *, ks: list[int] | None = None, absolute: bool = True,
    reference: Reference = "corrupt",
) -> dict[int, float]:
    """Faithfulness of the top-k circuit for every k in ``ks`` (default 0..n_heads), one batched pass."""
    means, _ = _reference_means(model, batch, reference)
    n = scores.scores.numel()
    ks = list(range(n + 1)) if ks is None else list(ks)
    order = scores.top(n, absolute=absolute)
    full = frozenset(order)
    diffs, _ = _ablated_metrics(model, batch, _outside(model, [full] + [frozenset(order[:k]) for k in ks]), means)
    return {k: round(float(d) / float(diffs[0]), 4) for k, d in zip(ks, diffs[1:])}


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class CircuitDiscovery:
    """Everything :func:`discover_circuit` found for one task (``to_dict()`` is JSON-able)."""

    task: str
    model: str
    scores: dict[str, HeadScores]
    circuit: Circuit
    faithfulness: dict[str, Any]
    minimality: dict[str, float]
    curve: dict[int, float]
    timings: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model,
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "circuit": self.circuit.to_dict(),
            "faithfulness": self.faithfulness,
            "minimality": self.minimality,
            "faithfulness_by_k": {str(k): v for k, v in self.curve.items()},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "meta": self.meta,
        }


def discover_circuit(
    model,
    task: str,
    *,
    n_prompts: int = 64,
    method: Literal["act_patch", "attribution", "path_patch"] = "act_patch",
    direction: Literal["noising", "denoising"] = "noising",
    top_k: int | None = None,
    threshold: float | None = None,
    target: float = 0.85,
    seed: int = 0,
    progress: bool = False,
) -> CircuitDiscovery:
    """Patching scores by every method, a circuit from one of them, and its faithfulness.

    Runs on ``task_batch(task, model.tokenizer, n_prompts, seed=seed)`` (held-out prompts): head
    activation patching (noising and denoising), attribution patching and path patching to the
    logits (all noising unless ``direction`` says otherwise, normalised logit difference), each
    timed. The circuit is chosen from ``method``'s scores by ``top_k`` / ``threshold``; with neither,
    the smallest top-k whose faithfulness reaches ``target`` (else the most faithful k).
    """
    from .patching import act_patch_heads, attribution_patch_heads, path_patch, timed
    from .tasks import task_batch

    batch = task_batch(task, model.tokenizer, n_prompts, seed=seed)
    other = "denoising" if direction == "noising" else "noising"
    scores, timings = {}, {}
    scores["act_patch"], timings["act_patch"] = timed(act_patch_heads, model, batch, direction=direction, progress=progress)
    scores[f"act_patch_{other}"], timings[f"act_patch_{other}"] = timed(
        act_patch_heads, model, batch, direction=other, progress=progress)
    scores["attribution"], timings["attribution"] = timed(attribution_patch_heads, model, batch, direction=direction)
    scores["path_patch"], timings["path_patch"] = timed(path_patch, model, batch, progress=progress)
    if method not in ("act_patch", "attribution", "path_patch"):
        raise ValueError(f"unknown method {method!r}: use 'act_patch', 'attribution' or 'path_patch'")
    chosen = scores[method]
    t0 = time.perf_counter()
    curve = faithfulness_curve(model, batch, chosen)
    if top_k is None and threshold is None:
        reached = [k for k, f in curve.items() if f >= target and k > 0]
        top_k = min(reached) if reached else max(curve, key=curve.get)
    circuit = select_circuit(chosen, top_k=top_k, threshold=threshold)
    faith = faithfulness(model, batch, circuit)
    mini = minimality(model, batch, circuit)
    timings["faithfulness"] = time.perf_counter() - t0
    meta = {"n_prompts": len(batch), "seed": seed, "method": method, "direction": direction,
            "target": target, "top_k": top_k, "threshold": threshold,
            "reached_target": faith["faithfulness"] >= target, **batch.meta}
    return CircuitDiscovery(task=task, model=model.cfg.model_name or "", scores=scores, circuit=circuit,
                            faithfulness=faith, minimality=mini, curve=curve, timings=timings, meta=meta)
