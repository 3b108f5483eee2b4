"""Checks for notebook 05 (the explorer): find the head whose OV circuit suppresses names (answered as
``"L.H"``), and every head's mean attention from one named position to another.

Each check compares the participant's answer with circuitlib on the embedded model (MAPS suppression
scores from :func:`circuitlib.scoring.static_scores`; :meth:`circuitlib.widgets.Explorer.attention_to`)
and prints one line (see :mod:`circuitlib.workshop`); none raises.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from . import CheckResult, run_check
from .nb00 import quiet

# ---------------------------------------------------------------------------------------------
# Exercise 1: find the head whose OV circuit suppresses names


def check_name_suppression_head(name_suppression_head: Callable, model) -> CheckResult:
    """``name_suppression_head()`` must return, as ``"L.H"``, the head with the highest MAPS
    suppression score for name copying (:func:`circuitlib.scoring.static_scores` with ``suppression=True``)."""
    from ..interventions import live_heads
    from ..scoring import static_scores
    from ..types import head_name

    suppression = static_scores(model, "name_copying", suppression=True)
    copying = static_scores(model, "name_copying")
    best = suppression.top(1)[0]
    live = set(live_heads(model))
    L, H = model.cfg.n_layers, model.cfg.n_heads

    def verify(answer):
        if isinstance(answer, (tuple, list)):
            return f"write the head as a string 'layer.head' (e.g. '{L - 1}.{H - 1}'), not {answer!r}."
        if not isinstance(answer, str) or not re.fullmatch(r"\s*\d+\.\d+\s*", answer):
            return f"write the head as 'layer.head', e.g. '{L - 1}.{H - 1}'; got {answer!r}."
        layer, head = (int(x) for x in answer.strip().split("."))
        if not (0 <= layer < L and 0 <= head < H):
            return f"head {layer}.{head} does not exist: the model has layers 0-{L - 1} and heads 0-{H - 1}."
        h = (layer, head)
        if h == best:
            return None
        if h not in live:
            return (f"{answer.strip()} is switched off (its OV weights are ~0): it writes nothing, so it suppresses "
                    f"nothing (suppression score {suppression[h]:.2f}).")
        if copying[h] > 0.3 and suppression[h] < 0.1:
            return (f"{answer.strip()} copies names (name-copying score {copying[h]:.2f}): its OV circuit maps a name "
                    f"onto itself. You want the opposite, a head that maps a name onto *minus* itself "
                    f"(suppression score {suppression[h]:.2f} here).")
        return (f"{answer.strip()} has a name-suppression score of {suppression[h]:.2f}: for that share of names the "
                f"name is the token it pushes down hardest. Another head does this for far more names.")

    return quiet(run_check("find the name-suppression head", name_suppression_head, verify,
                           success=f"{head_name(best)}: MAPS suppression score {suppression[best]:.2f}, the highest "
                                   f"of the {L * H} heads (name-copying score {copying[best]:.2f}).",
                           hint="in the explorer pick 'name_copying (suppression)': heads are sorted by score; "
                                "or explorer.heads('name_copying (suppression)')"))


# ---------------------------------------------------------------------------------------------
# Exercise 2: every head's mean attention from one named position to another

ATTENTION_CASES = (("END", "IO"), ("END", "S2"), ("S2", "S1"))


def _reference(model, batch, query: str, key: str) -> torch.Tensor:
    from ..types import HeadScores
    from ..widgets import Explorer

    blank = HeadScores(torch.zeros(model.cfg.n_layers, model.cfg.n_heads), "none", "none", model.cfg.model_name or "")
    return Explorer(model, {"none": blank}, {"task": batch}).attention_to("task", key, query).scores


@torch.no_grad()
def _variants(model, batch, query: str, key: str) -> dict[str, torch.Tensor]:
    """Plausible mistakes, to say which one was made."""
    _, cache = model.run_with_cache(batch.clean, names_filter=lambda n: n.endswith("hook_pattern"))
    rows = torch.arange(len(batch))
    q, k = batch.positions[query], batch.positions[key]
    pats = [cache["pattern", l] for l in range(model.cfg.n_layers)]
    return {
        "transposed": torch.stack([p[rows, :, k, q].mean(0) for p in pats]),
        "last column": torch.stack([p[rows, :, -1, k].mean(0) for p in pats]) if query == "END" else None,
        "sum": torch.stack([p[rows, :, q, k].sum(0) for p in pats]),
    }


def check_mean_attention(mean_attention: Callable, model, batch) -> CheckResult:
    """``mean_attention(model, batch, query, key)`` must return every head's attention from position
    ``query`` to position ``key`` (names in ``batch.positions``), averaged over the batch's clean prompts,
    as a ``[n_layers, n_heads]`` tensor; compared with :meth:`circuitlib.widgets.Explorer.attention_to`."""
    shape = (model.cfg.n_layers, model.cfg.n_heads)

    def attempt():
        return [mean_attention(model, batch, q, k) for q, k in ATTENTION_CASES]

    def verify(results):
        for (q, k), got in zip(ATTENTION_CASES, results):
            got = torch.as_tensor(got).detach().float().cpu()
            if tuple(got.shape) != shape:
                if tuple(got.shape) == shape[::-1]:
                    return f"{q} -> {k}: shape {tuple(got.shape)} is [head, layer]; return [layer, head] = {shape}."
                return f"{q} -> {k}: expected a [n_layers, n_heads] = {shape} tensor, got shape {tuple(got.shape)}."
            want = _reference(model, batch, q, k)
            if torch.allclose(got, want, atol=1e-4):
                continue
            for name, value in _variants(model, batch, q, k).items():
                if value is not None and torch.allclose(got, value, atol=1e-4):
                    return {
                        "transposed": f"{q} -> {k}: you read the pattern as [key, query]; TransformerLens's pattern is "
                                      "[batch, head, query position, key position].",
                        "last column": f"{q} -> {k}: you read the last position of the padded batch; prompts have "
                                       "different lengths, so take each prompt's own END (batch.positions['END']).",
                        "sum": f"{q} -> {k}: you summed over prompts; take the mean.",
                    }[name]
            worst = (got - want).abs().max().item()
            return f"{q} -> {k}: your values differ from circuitlib's by up to {worst:.3f}."
        return None

    return quiet(run_check("mean attention between positions", attempt, verify,
                           success="matches Explorer.attention_to for "
                                   + ", ".join(f"{q} -> {k}" for q, k in ATTENTION_CASES) + ".",
                           hint="pattern = cache['pattern', layer]  # [batch, head, query, key]; rows = "
                                "torch.arange(len(batch)); pattern[rows, :, batch.positions[query], "
                                "batch.positions[key]].mean(0)"))
