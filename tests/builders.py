"""Inputs several test modules build the same way (not an oracle: nothing here computes an expected value)."""

from __future__ import annotations

import torch

from circuitlib import causal
from circuitlib.scoring import static_scores_many
from circuitlib.tasks import task_batch
from circuitlib.types import Circuit, HeadScores

CAPITAL = "country_to_capital_wikidata"


def copying_scores_disjoint_from_capitals(toy) -> tuple[dict[str, HeadScores], list]:
    """The real MAPS scores, with name copying replaced by a fabricated scoring whose top heads are
    disjoint from the capital heads (so name copying qualifies as the capital relation's control).
    Returns (scores, capital heads)."""
    real = static_scores_many(toy, [CAPITAL])
    cap_heads = causal.relation_heads(real[CAPITAL], 3)
    n_layers, n_heads = toy.cfg.n_layers, toy.cfg.n_heads
    fake = torch.zeros(n_layers, n_heads)
    free = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in cap_heads]
    for i, (l, h) in enumerate(free[: len(cap_heads)]):
        fake[l, h] = 1.0 - 0.01 * i
    return {**real, "name_copying": HeadScores(fake, "maps_static", "name_copying", "toy")}, cap_heads


def random_reuse_inputs(toy, seed: int = 0):
    """Random MAPS and patching scores for IOI and capitals, 2-head circuits from the patching scores and
    8-prompt batches: (rel, patch, circuits, batches) for ``reuse.reuse_analysis``."""
    g = torch.Generator().manual_seed(seed)
    shape = (toy.cfg.n_layers, toy.cfg.n_heads)
    rel = {"ioi": HeadScores(torch.rand(*shape, generator=g), "maps_static", "name_copying", "toy"),
           "capitals": HeadScores(torch.rand(*shape, generator=g), "maps_static", CAPITAL, "toy")}
    patch = {t: HeadScores(torch.randn(*shape, generator=g), "act_patch", t, "toy") for t in rel}
    circuits = {t: Circuit.of(patch[t].top(2, absolute=True), t, "toy") for t in patch}
    batches = {t: task_batch(t, toy.tokenizer, 8, seed=0) for t in patch}
    return rel, patch, circuits, batches
