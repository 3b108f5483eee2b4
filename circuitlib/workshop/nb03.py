"""Checks for the exercises of notebook 03 (head scoring).

Each ``check_*`` function runs the participant's function on the embedded model, compares it with
circuitlib, and prints one line (``✓`` / ``✗`` with what is wrong and a hint / ``… not done yet``);
it never raises (see :func:`circuitlib.workshop.run_check`).

- :func:`check_static_score`: one head's MAPS static score by hand from ``W_E``, ``W_V``, ``W_O``,
  ``W_U`` with ``torch.topk`` (ties across the k-th place are misses) against
  :func:`circuitlib.scoring.static_scores`, on three heads (the best name copier, the best capital head,
  the name-suppression head) and a constructed all-tie head.
- :func:`check_most_suppressed`: the tokens a head's OV circuit pushes down most for one source token
  against :func:`circuitlib.scoring.top_mapped_tokens` with ``suppression=True``.
- :func:`check_attention_to`: a head's mean attention from one position to another per prompt
  (``hook_pattern`` is ``[batch, head, query, key]``) against a direct read of the cache.

All take the model (default: the embedded model, loaded once) and build their own inputs, so the
result does not depend on what the notebook did before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from transformer_lens import HookedTransformer

from . import CheckResult, close, run_check

SCORE_TOL = 1e-6  # scores are fractions of pairs: exact up to float rounding
ATTN_TOL = 1e-4


@lru_cache(maxsize=1)
def _toy() -> HookedTransformer:
    from ..models import load_model

    return load_model("toy")


def _model(model: HookedTransformer | None) -> HookedTransformer:
    return _toy() if model is None else model


def _num(x) -> float | None:
    """A participant's number as a float (0-d / one-element tensors too); None if it is not one."""
    try:
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                return None
            x = x.item()
        return float(x)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Exercise 1: one head's MAPS static score by hand

#: (head, relation, k) cases the check runs: the best name copier (0.6) at k = 1, the best capital head (0.3) at
#: k = 10, and the name-suppression head (0.2, one of the two IOI heads; static copying score 0: its OV map sends
#: a name to *minus* the name).
STATIC_CASES = (((0, 6), "name_copying", 1), ((0, 3), "country_to_capital_wikidata", 10), ((0, 2), "name_copying", 1))


def _tie_case():
    """A 5-token vocabulary and a head whose OV output is exactly zero: every logit ties, so no
    target can be in the top-k for sure (MAPS via circuitlib: score 0). A plain ``torch.topk``
    membership test counts k of the 5 targets as hits."""
    d_model, d_head, vocab = 4, 2, 5
    gen = torch.Generator().manual_seed(0)
    W_E = torch.randn(vocab, d_model, generator=gen)
    W_V = torch.randn(d_model, d_head, generator=gen)
    W_O = torch.zeros(d_head, d_model)
    W_U = torch.randn(d_model, vocab, generator=gen)
    src = torch.zeros(vocab, dtype=torch.long)
    tgt = torch.arange(vocab)
    return W_E, W_V, W_O, W_U, src, tgt


@torch.no_grad()
def _static_variants(model: HookedTransformer, layer: int, head: int, pairs, k: int) -> dict[str, float]:
    """What plausible mistakes would return, to say which one was made."""
    from ..scoring import topk_hits

    W_E, W_U = model.W_E, model.W_U
    W_V, W_O = model.W_V[layer, head], model.W_O[layer, head]
    rows = W_E[pairs.src] @ W_V @ W_O
    idx = torch.arange(len(pairs))
    W_U_T = W_U.T.contiguous()

    def score(r, kk, suppression=False):
        return float(topk_hits(r, W_U_T, idx, pairs.tgt, kk, suppression=suppression).float().mean())

    other_k = 10 if k == 1 else 1
    return {
        "suppression": score(rows, k, suppression=True),
        "other_k": score(rows, other_k),
        "at_1": score(rows, 1),
        "at_10": score(rows, 10),
        "count": score(rows, k) * len(pairs),
        "other_k_value": other_k,
    }


def _static_problem(cases: list[tuple[str, str, int]], got: list[float], want: list[float],
                    variants: list[dict[str, float]]) -> str:
    """Name the mistake that explains the participant's values on *every* head, else the first mismatch."""

    def explains(key, tol=SCORE_TOL):
        return (all(close(g, v[key], tol) for g, v in zip(got, variants))
                and not all(close(w, v[key], tol) for w, v in zip(want, variants)))

    shown = "; ".join(f"{name} {rel.split('_')[0]}: {g:.4f} (expected {w:.4f})"
                      for (name, rel, _), g, w in zip(cases, got, want))
    if explains("count", 1e-3):
        return f"you returned the number of pairs that hit; the score is the fraction of pairs ({shown})."
    if explains("suppression"):
        return (f"you returned the suppression score (top-k of -m_s); the static score takes the top-k of m_s "
                f"itself ({shown}).")
    if explains("other_k") or explains("at_1") or explains("at_10"):
        return (f"your scores are those at the wrong k (k = 1 where k = 10 is given, or the reverse); use the k you "
                f"are given ({shown}).")
    for (name, rel, k), g, w in zip(cases, got, want):
        if not close(g, w, SCORE_TOL):
            return (f"head {name}, {rel} at k = {k}: you returned {g:.4f}; circuitlib's static_scores gives {w:.4f}. "
                    "Check the product m_s = W_E[src] @ W_V @ W_O @ W_U (one row per pair), that a pair hits when its "
                    "target is among torch.topk(m_s, k).indices, and that you average over pairs.")
    return ""


def check_static_score(static_score: Callable, model: HookedTransformer | None = None) -> CheckResult:
    """Check ``static_score(W_E, W_V, W_O, W_U, src, tgt, k) -> float`` (one head's MAPS static score;
    ``W_V``: ``[d_model, d_head]``, ``W_O``: ``[d_head, d_model]``; ties across the k-th place are
    misses) on heads 0.6 (name copying, k = 1), 0.3 (country -> capital, k = 10) and 0.2 (name
    copying), against :func:`circuitlib.scoring.static_scores`, then on an all-zero head of a
    5-token vocabulary (every logit ties: score 0)."""
    from ..scoring import static_scores
    from ..tasks import load_relation
    from ..types import head_name

    model = _model(model)
    relations = {r: load_relation(r, model.tokenizer) for _, r, _ in STATIC_CASES}
    want = {(head, r): static_scores(model, relations[r], k=k)[head] for head, r, k in STATIC_CASES}

    def attempt():
        out = []
        with torch.no_grad():
            for (l, h), r, k in STATIC_CASES:
                p = relations[r]
                out.append(static_score(model.W_E, model.W_V[l, h], model.W_O[l, h], model.W_U, p.src, p.tgt, k))
            out.append(static_score(*_tie_case(), 1))
        return out

    def verify(results):
        values = []
        for ((l, h), r, k), got in zip(STATIC_CASES, results):
            value = _num(got)
            if value is None:
                return (f"for head {head_name((l, h))} ({r}) you returned {type(got).__name__} {got!r:.60}; return "
                        "one number, the fraction of pairs that hit (a float or a one-element tensor).")
            values.append(value)
        targets = [want[(hd, r)] for hd, r, _ in STATIC_CASES]
        if not all(close(v, t, SCORE_TOL) for v, t in zip(values, targets)):
            variants = [_static_variants(model, l, h, relations[r], k) for (l, h), r, k in STATIC_CASES]
            cases = [(head_name(hd), r, k) for hd, r, k in STATIC_CASES]
            return _static_problem(cases, values, targets, variants)
        tie = _num(results[-1])
        if tie is None or not close(tie, 0.0, SCORE_TOL):
            shown = f"{tie:.3f}" if tie is not None else f"{results[-1]!r:.40}"
            return (f"the three heads match, but on a head whose OV output is exactly zero (every logit ties) you "
                    f"returned {shown} instead of 0: torch.topk then keeps an arbitrary k of the tied "
                    "entries. Count a target as a miss when the (k+1)-th largest logit equals the target's logit "
                    "(fewer than k *other* entries may reach it).")
        return None

    shown = ", ".join(f"{head_name(hd)} {r.split('_')[0]} ({want[(hd, r)]:.2f})" for hd, r, _ in STATIC_CASES)
    return run_check(
        "static_score", attempt, verify,
        success=f"matches circuitlib's static_scores for heads {shown}, and scores an all-tie head 0.",
        hint="m = W_E[src] @ W_V @ W_O @ W_U is [n_pairs, d_vocab]; top = torch.topk(m, k + 1, dim=-1); a pair hits "
             "when its target is in top.indices[:, :k] and its logit is above top.values[:, k].",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 2: the tokens a head suppresses most


#: (head, source word): the name-suppression head 0.2 and the best name copier 0.6 on a name, and 0.5 (the
#: other IOI head, which also pushes capitals down) on a country.
SUPPRESSED_CASES = (((0, 2), "Mallory"), ((0, 6), "Mallory"), ((0, 5), "France"))


def check_most_suppressed(most_suppressed: Callable, model: HookedTransformer | None = None, n: int = 10) -> CheckResult:
    """Check ``most_suppressed(model, layer, head, src, n) -> token ids`` (the ``n`` vocabulary entries
    with the most negative ``m_s``, most negative first) against
    :func:`circuitlib.scoring.top_mapped_tokens` with ``suppression=True``."""
    from ..scoring import top_mapped_tokens
    from ..tasks._common import word_id
    from ..types import head_name

    model = _model(model)
    tok = model.tokenizer
    cases = [(head, word, word_id(tok, word)) for head, word in SUPPRESSED_CASES]
    want = {(head, word): [t for t, _ in top_mapped_tokens(model, head, src, n=n, suppression=True)]
            for head, word, src in cases}
    promoted = {(head, word): [t for t, _ in top_mapped_tokens(model, head, src, n=n)] for head, word, src in cases}

    def attempt():
        with torch.no_grad():
            return [most_suppressed(model, l, h, src, n) for (l, h), _, src in cases]

    def verify(results):
        for (head, word, _), got in zip(cases, results):
            name = head_name(head)
            try:
                ids = [int(i) for i in (got.tolist() if isinstance(got, torch.Tensor) else got)]
            except (TypeError, ValueError):
                return (f"head {name}, {word!r}: you returned {type(got).__name__} {got!r:.60}; return the token "
                        "ids (a list of ints or a 1-D tensor, e.g. torch.topk(...).indices).")
            words = [tok.decode([i]) for i in ids]
            target = want[(head, word)]
            if words == target:
                continue
            if len(ids) != n:
                return f"head {name}, {word!r}: you returned {len(ids)} tokens; return exactly n = {n}."
            if words == promoted[(head, word)]:
                return (f"head {name}, {word!r}: these are the {n} tokens the head pushes *up* most "
                        f"({', '.join(w.strip() for w in words[:3])}, ...); the most suppressed are the top of -m_s.")
            if set(words) == set(target):
                return (f"head {name}, {word!r}: the right tokens in the wrong order; put the most suppressed "
                        "(most negative logit) first.")
            if words == list(reversed(promoted[(head, word)])) or words[::-1] == target:
                return f"head {name}, {word!r}: the right tokens in reverse order; put the most suppressed first."
            return (f"head {name}, {word!r}: you returned {', '.join(w.strip() for w in words[:4])}, ...; circuitlib "
                    f"gives {', '.join(w.strip() for w in target[:4])}, ... (m_s = W_E[src] @ W_V @ W_O @ W_U of "
                    "this head, then the n most negative entries).")
        return None

    return run_check(
        "most_suppressed", attempt, verify,
        success=f"matches circuitlib's top_mapped_tokens(..., suppression=True) for "
                f"{', '.join(f'{head_name(h)} on {w!r}' for h, w, _ in cases)}.",
        hint="m = model.W_E[src] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U; "
             "return torch.topk(-m, n).indices.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 3: attention from one position to another


@torch.no_grad()
def _pattern(model: HookedTransformer, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    return cache["pattern", layer]


def check_attention_to(attention_to: Callable, model: HookedTransformer | None = None) -> CheckResult:
    """Check ``attention_to(model, tokens, query_pos, key_pos, layer, head) -> float`` (the head's
    attention from ``query_pos[i]`` to ``key_pos[i]`` in prompt ``i``, averaged over prompts) on 32
    capital prompts (END -> the country, capital head 0.3), on 32 IOI prompts (END -> S2, IOI head 0.5)
    and on MAPS's dynamic prompts for name copying (last position -> the name, head 0.4)."""
    from ..scoring import dynamic_prompts
    from ..tasks import load_relation, task_batch
    from ..types import head_name

    model = _model(model)
    cap = task_batch("capitals", model.tokenizer, 32, seed=3)
    ioi = task_batch("ioi", model.tokenizer, 32, seed=3)
    dyn, src_pos, end = dynamic_prompts(model, load_relation("name_copying", model.tokenizer))
    dyn, src_pos, end = dyn[:32], src_pos[:32], end[:32]
    cases = [("capital prompts, END -> country", cap.clean, cap.end, cap.positions["COUNTRY"], (0, 3)),
             ("IOI prompts, END -> S2", ioi.clean, ioi.end, ioi.positions["S2"], (0, 5)),
             ("'This is a document about <X>', last position -> X", dyn, end, src_pos, (0, 4))]
    rows = {id(c): torch.arange(c[1].shape[0]) for c in cases}

    def truth(case, swap=False, first=False, sum_heads=False):
        what, tokens, q, k, (l, h) = case
        pat = _pattern(model, tokens, l)
        r = rows[id(case)]
        if swap:
            q, k = k, q
        if first:
            q, k = q[:1].expand_as(q), k[:1].expand_as(k)
        return float(pat[r, :, q, k].mean() if sum_heads else pat[r, h, q, k].mean())

    want = [truth(c) for c in cases]

    def attempt():
        with torch.no_grad():
            return [attention_to(model, tokens, q, k, l, h) for _, tokens, q, k, (l, h) in cases]

    def verify(results):
        for case, got, target in zip(cases, results, want):
            what, head = case[0], head_name(case[4])
            value = _num(got)
            if value is None:
                return (f"head {head}, {what}: you returned {type(got).__name__} {got!r:.60}; return one number, "
                        "the mean over prompts.")
            if close(value, target, ATTN_TOL):
                continue
            if not 0 <= value <= 1 + ATTN_TOL:
                return (f"head {head}, {what}: you returned {value:.3f}, not a probability; read the softmaxed "
                        "pattern (hook_pattern, cache['pattern', layer]), not the scores before the softmax.")
            if close(value, truth(case, swap=True), ATTN_TOL):
                return (f"head {head}, {what}: you returned {value:.3f}, the attention from the key position to the "
                        f"query position; hook_pattern is [batch, head, query, key] ({target:.3f}).")
            if close(value, truth(case, first=True), ATTN_TOL):
                return (f"head {head}, {what}: you returned {value:.3f}, with the first prompt's positions for every "
                        "prompt; index each prompt with its own query_pos[i] and key_pos[i].")
            if close(value, truth(case, sum_heads=True), ATTN_TOL):
                return f"head {head}, {what}: you returned {value:.3f}, the mean over all heads; pick this head."
            return (f"head {head}, {what}: you returned {value:.3f}; reading the cache directly gives {target:.3f} "
                    "(pattern[i, head, query_pos[i], key_pos[i]], averaged over prompts i).")
        return None

    shown = "; ".join(f"{head_name(c[4])} {c[0]}: {w:.2f}" for c, w in zip(cases, want))
    return run_check(
        "attention_to", attempt, verify,
        success=f"matches the cached attention patterns ({shown}).",
        hint="_, cache = model.run_with_cache(tokens); pat = cache['pattern', layer] is [batch, head, query, key]; "
             "rows = torch.arange(len(tokens)); pat[rows, head, query_pos, key_pos].mean().",
    )
