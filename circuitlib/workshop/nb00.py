"""Checks for notebook 00 (the primer): a head's attention pattern from its QK weights, its OV circuit
applied to a token, and how a permutation p-value is obtained (exact or Monte Carlo, smallest p).

Each check compares the participant's function with circuitlib (or TransformerLens's cache) on the
embedded model and prints one line (see :mod:`circuitlib.workshop`); none raises. The returned
:class:`~circuitlib.workshop.CheckResult` shows nothing more when it is a cell's last value, so a check
cell prints its line once (nbval does not honour a trailing ``;``)."""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch
from transformer_lens import HookedTransformer

from . import CheckResult, close, run_check


class _Printed(CheckResult):
    """A check result that :func:`run_check` already printed: no second copy as a cell's output."""

    def _ipython_display_(self) -> None:
        pass


def quiet(result: CheckResult) -> CheckResult:
    """``result``, marked as printed (see :class:`_Printed`)."""
    result.__class__ = _Printed
    return result


# ---------------------------------------------------------------------------------------------
# Exercise 1: a head's attention pattern from its QK weights

#: 0.2 reads the repeated name S2 from END in IOI and matters most for it (primer §3, §7); 1.2 reads one
#: name from END by its place in "A and B" and is among the top-3 heads of capitals and Colored Objects.
PATTERN_CASES = ((0, 2), (1, 2))


def check_attention_pattern(attention_pattern: Callable, model: HookedTransformer, tokens) -> CheckResult:
    """``attention_pattern(model, cache, layer, head)`` must return the head's attention pattern
    ``[query, key]`` for the one prompt in ``cache``, recomputed from ``W_Q``, ``W_K`` and the layer's
    LayerNorm; compared with TransformerLens's ``hook_pattern``."""
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    _, cache = model.run_with_cache(tokens[:1])
    n = tokens.shape[-1]

    def attempt():
        return [attention_pattern(model, cache, l, h) for l, h in PATTERN_CASES]

    def verify(results):
        for (l, h), got in zip(PATTERN_CASES, results):
            want = cache["pattern", l][0, h].detach()
            got = torch.as_tensor(got).detach().float()
            if got.ndim == 3 and got.shape[0] == 1:
                got = got[0]
            if tuple(got.shape) != (n, n):
                return f"head {l}.{h}: expected a [query, key] matrix of shape ({n}, {n}), got {tuple(got.shape)}."
            if torch.allclose(got, want, atol=1e-4):
                continue
            if torch.allclose(got.T, want, atol=1e-4):
                return f"head {l}.{h}: your matrix is transposed: rows are queries (who reads), columns keys (what is read)."
            if not torch.allclose(got.sum(-1), torch.ones(n), atol=1e-3):
                return (f"head {l}.{h}: your rows do not sum to 1: take the softmax over the key dimension (dim=-1), "
                        "after masking.")
            if got.triu(1).abs().max() > 1e-4:
                return (f"head {l}.{h}: position i attends to later positions: mask scores above the diagonal with "
                        "-inf before the softmax (causal attention).")
            return (f"head {l}.{h}: your pattern differs from hook_pattern by up to "
                    f"{(got - want).abs().max():.3f}. Use the LayerNorm *output* (hook_normalized * ln1.w + ln1.b), "
                    "the biases b_Q and b_K, and divide the scores by sqrt(d_head).")
        return None

    return quiet(run_check("attention pattern from the QK circuit", attempt, verify,
                           success=f"matches TransformerLens's hook_pattern for heads "
                                   f"{', '.join(f'{l}.{h}' for l, h in PATTERN_CASES)}.",
                           hint="x = normalized * ln1.w + ln1.b; q = x W_Q + b_Q; k = x W_K + b_K; "
                                "scores = q k^T / sqrt(d_head); causal mask; softmax(dim=-1)"))

# ---------------------------------------------------------------------------------------------
# Exercise 2: a head's OV circuit applied to one token

#: 0.3 and 0.4: the two highest MAPS country -> capital heads; 0.2: the name-suppression head (primer §4).
OV_CASES = (((0, 3), "France"), ((0, 2), "Mary"), ((0, 4), "Tokyo"))


def _as_vector(x) -> torch.Tensor:
    t = torch.as_tensor(x).detach().float().cpu()
    return t.squeeze(0) if t.ndim == 2 and t.shape[0] == 1 else t


def check_ov_logits(ov_logits: Callable, model: HookedTransformer) -> CheckResult:
    """``ov_logits(model, layer, head, token_id)`` must return ``W_E[token] W_V W_O W_U`` (one logit per
    vocabulary entry), compared with :func:`circuitlib.scoring.top_mapped_tokens` on three heads."""
    from ..tasks._common import word_id
    from ..scoring import top_mapped_tokens

    cases = [((l, h), w, word_id(model.tokenizer, w)) for (l, h), w in OV_CASES]
    d_vocab, d_model = model.cfg.d_vocab, model.cfg.d_model

    def attempt():
        return [ov_logits(model, l, h, tok) for (l, h), _, tok in cases]

    def verify(results):
        for ((l, h), word, tok), got in zip(cases, results):
            vec = _as_vector(got)
            if vec.ndim != 1:
                return f"head {l}.{h}, token {word!r}: expected a vector of {d_vocab} logits, got shape {tuple(vec.shape)}."
            if vec.shape[0] == d_model:
                return (f"head {l}.{h}, token {word!r}: your vector has {d_model} entries (d_model), a direction in "
                        "the residual stream. Multiply by model.W_U to get one logit per vocabulary token.")
            if vec.shape[0] != d_vocab:
                return f"head {l}.{h}, token {word!r}: expected {d_vocab} logits (d_vocab), got {vec.shape[0]}."
            ref = top_mapped_tokens(model, (l, h), tok, n=10)
            ref_vals = np.array([v for _, v in ref])
            top = torch.topk(vec, 10)
            got_words = [model.tokenizer.decode([int(i)]) for i in top.indices]
            if got_words == [t for t, _ in ref] and np.allclose(top.values.numpy(), ref_vals, atol=2e-4):
                continue
            flipped = torch.topk(-vec, 10)
            if [model.tokenizer.decode([int(i)]) for i in flipped.indices] == [t for t, _ in ref]:
                return (f"head {l}.{h}, token {word!r}: your logits have the wrong sign (that is the suppression "
                        "view, -m). Check the order W_E[token] @ W_V @ W_O @ W_U and drop any minus sign.")
            return (f"head {l}.{h}, token {word!r}: your top tokens are {got_words[:5]}, circuitlib's are "
                    f"{[t for t, _ in ref][:5]}. MAPS uses the raw token embedding (no LayerNorm, no positional "
                    "embedding) and no biases.")
        return None

    return quiet(run_check("OV circuit of a head", attempt, verify,
                           success=f"W_E[token] W_V W_O W_U matches circuitlib's OV view on heads "
                                   f"{', '.join(f'{l}.{h}' for (l, h), _ in OV_CASES)}.",
                           hint="model.W_E[token_id] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U"))




# ---------------------------------------------------------------------------------------------
# Exercise 3: exact or Monte Carlo, and the smallest attainable p

PLAN_SIZES = (4, 6, 8, 9, 12)


def reference_plan(n_heads: int) -> tuple[str, int, float]:
    """What :func:`circuitlib.overlap.rank_correlation` does for two untied scorings of ``n_heads``
    heads (permuted over all heads): ``(method, relabellings enumerated or drawn, smallest p)``."""
    from ..overlap import rank_correlation
    from ..types import HeadScores

    x = torch.arange(n_heads, dtype=torch.float32)[None]
    y = x.flip(-1)
    r = rank_correlation(HeadScores(x, "a", "x", "toy"), HeadScores(y, "b", "x", "toy"))
    return ("exact" if r["exact"] else "monte carlo"), int(r["n_permutations"]), float(r["min_p"])


def check_permutation_plan(permutation_plan: Callable) -> CheckResult:
    """``permutation_plan(n_heads)`` must return ``(method, count, min_p)`` for a two-sided Spearman
    test on ``n_heads`` untied heads as circuitlib runs it (exact up to 50,000 permutations, else
    20,000 Monte Carlo draws with +1), compared with :func:`circuitlib.overlap.rank_correlation`."""
    import math

    def attempt():
        return [permutation_plan(n) for n in PLAN_SIZES]

    def verify(results):
        for n, got in zip(PLAN_SIZES, results):
            want = reference_plan(n)
            try:
                method, count, min_p = got
                method = str(method).lower().replace("_", " ").replace("-", " ")
                count, min_p = int(count), float(min_p)
            except (TypeError, ValueError):
                return f"{n} heads: return a tuple (method, count, min_p), e.g. ('exact', 24, 0.0833); got {got!r}."
            if method != want[0]:
                return (f"{n} heads: {n}! = {math.factorial(n):,} permutations, so circuitlib's test is "
                        f"{want[0]!r} (it enumerates when there are at most 50,000), not {method!r}.")
            if count != want[1]:
                what = "all n! permutations are enumerated" if want[0] == "exact" else "20,000 random permutations are drawn"
                return f"{n} heads: count should be {want[1]:,} ({what}); got {count:,}."
            if not close(min_p, want[2], 1e-12):
                if want[0] == "exact" and close(min_p, 1 / want[1], 1e-12):
                    return (f"{n} heads: two orderings reach |rho| = 1 (the observed one and its reversal, rho = -1), "
                            f"so the smallest two-sided p is 2/{want[1]:,}, not 1/{want[1]:,}.")
                if want[0] == "monte carlo" and close(min_p, 1 / want[1], 1e-12):
                    return (f"{n} heads: with the +1 correction the smallest Monte Carlo p is 1/(1 + 20,000), "
                            "not 1/20,000.")
                return f"{n} heads: smallest p should be {want[2]:.3g}; got {min_p:.3g}."
        return None

    return quiet(run_check("exact or Monte Carlo", attempt, verify,
                           success=f"method, count and smallest p match circuitlib's rank_correlation for "
                                   f"{', '.join(map(str, PLAN_SIZES))} heads.",
                           hint="exact when n! <= 50,000 (count n!, min p 2/n!), else Monte Carlo "
                                "(count 20,000, min p 1/20,001)"))
