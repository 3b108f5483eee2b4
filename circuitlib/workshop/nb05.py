"""Checks for notebook 05 (the explorer): find the head whose OV circuit suppresses names (answered as
``"L.H"``), and a new head-scoring method for the registry (zero-ablation) that the explorer's patching
view picks up.

Each check compares the participant's answer with circuitlib on the embedded model (MAPS suppression
scores from :func:`circuitlib.scoring.static_scores`; zero-ablation through
:func:`circuitlib.interventions.run_ablations`) and prints one line (see :mod:`circuitlib.workshop`);
none raises.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from transformer_lens import HookedTransformer

from . import CheckResult, run_check
from .nb00 import quiet

# ---------------------------------------------------------------------------------------------
# Exercise 1: find the head whose OV circuit suppresses names


def check_name_suppression_head(name_suppression_head: Callable, model: HookedTransformer) -> CheckResult:
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
# Exercise 2: a new head-scoring method for the registry: zero-ablation


def zero_ablation_scorer(model: HookedTransformer, batch, *, direction: str = "noising", progress: bool = False):
    """circuitlib's zero-ablation head scores, with the registry's signature
    (:func:`circuitlib.circuits.register_scorer`): per head, the share of the clean - corrupted logit
    difference lost when the head's ``hook_z`` is set to 0 at every position of the clean prompts,
    ``(clean - ablated) / (clean - corrupted)``. ``direction`` does not apply (recorded as such)."""
    from ..interventions import Ablation, run_ablations
    from ..metrics import logit_diff
    from ..types import HeadScores

    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    with torch.no_grad():
        clean = float(logit_diff(model(batch.clean), batch))
        corrupt = float(logit_diff(model(batch.corrupt), batch))
    ablation = Ablation(kind="zero", bos=True)
    ablated = run_ablations(model, batch, [[h] for h in heads], ablation).mean_logit_diff
    scores = ((clean - ablated) / (clean - corrupt)).view(model.cfg.n_layers, model.cfg.n_heads)
    return HeadScores(scores, "zero_ablation", batch.task, model.cfg.model_name or "",
                      meta={"direction": "none (zero-ablation)", "metric": "normalised_logit_diff",
                            "ablation": ablation.describe(), "n_prompts": len(batch)})


def _mean_variant(model: HookedTransformer, batch):
    from ..interventions import Ablation, run_ablations
    from ..metrics import logit_diff

    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    with torch.no_grad():
        clean = float(logit_diff(model(batch.clean), batch))
        corrupt = float(logit_diff(model(batch.corrupt), batch))
    ablated = run_ablations(model, batch, [[h] for h in heads], Ablation()).mean_logit_diff
    return ((clean - ablated) / (clean - corrupt)).view(model.cfg.n_layers, model.cfg.n_heads), clean, corrupt


def check_zero_ablation_scores(zero_ablation_scores: Callable, model: HookedTransformer, batch) -> CheckResult:
    """``zero_ablation_scores(model, batch, direction=..., progress=...)`` must return every head's
    zero-ablation score (:func:`zero_ablation_scorer`, built on :func:`circuitlib.interventions.run_ablations`)
    as HeadScores or a ``[n_layers, n_heads]`` tensor."""
    from ..types import HeadScores

    shape = (model.cfg.n_layers, model.cfg.n_heads)
    want = zero_ablation_scorer(model, batch).scores

    def attempt():
        return zero_ablation_scores(model, batch, direction="noising", progress=False)

    def verify(got):
        got = got.scores if isinstance(got, HeadScores) else torch.as_tensor(got)
        got = got.detach().float().cpu()
        if tuple(got.shape) != shape:
            return f"return HeadScores (or a tensor) of shape [n_layers, n_heads] = {shape}; got {tuple(got.shape)}."
        if torch.allclose(got, want, atol=2e-3):
            return None
        mean, clean, corrupt = _mean_variant(model, batch)
        if torch.allclose(got, -want, atol=2e-3):
            return "the sign is flipped: a head whose removal *lowers* the logit difference must score > 0."
        if torch.allclose(got, 1 - want, atol=2e-3):
            return ("you returned the normalised logit difference *with* the head ablated; the score is what is lost: "
                    "1 minus that, (clean - ablated) / (clean - corrupted).")
        if torch.allclose(got, want * (clean - corrupt), atol=2e-2):
            return ("your scores are in raw logits (clean - ablated); divide by (clean - corrupted) so that 1 = the "
                    "whole clean-vs-corrupted gap.")
        if torch.allclose(got, mean, atol=2e-3):
            return "that is mean-ablation (values from the corrupted prompts); set the head's hook_z to 0."
        h = divmod(int((got - want).abs().argmax()), shape[1])
        return (f"head {h[0]}.{h[1]}: got {got[h]:.3f}, circuitlib gives {want[h]:.3f} (the largest difference).")

    return quiet(run_check("zero-ablation scorer", attempt, verify,
                           success="matches circuitlib's zero-ablation scores (interventions.run_ablations, "
                                   f"kind='zero') on all {shape[0] * shape[1]} heads.",
                           hint="for each head: a hook on blocks.{l}.attn.hook_z that sets z[:, :, h] = 0; logit "
                                "difference at END; score = (clean - ablated) / (clean - corrupted)"))
