"""Checks for notebook 01 (the model and the tasks): an IOI prompt's positions (IO, S1, S2, END) read off
its tokens, and an ABC-corrupted prompt with its logit difference computed by hand.

Each check compares the participant's function with circuitlib (the :class:`TaskBatch` a task builder
made, :func:`circuitlib.metrics.logit_diff`) on the embedded model and prints one line (see
:mod:`circuitlib.workshop`); none raises.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformer_lens import HookedTransformer

from . import CheckResult, close, run_check
from .nb00 import quiet

KEYS = ("IO", "S1", "S2", "END")
N_ROWS = 8  # prompts checked: both BABA and ABBA templates (batches alternate them)


def _template_kind(batch, i: int) -> str:
    t = (batch.template or [""] * len(batch))[i]
    return "ABBA" if t.index("[A]") < t.index("[B]") else "BABA"


# ---------------------------------------------------------------------------------------------
# Exercise 1: IO, S1, S2 and END positions of an IOI prompt


def check_find_positions(find_positions: Callable, model: HookedTransformer, batch) -> CheckResult:
    """``find_positions(words, names)`` must return ``{"IO", "S1", "S2", "END"}`` -> position for an IOI
    prompt's string tokens (BOS first), compared with the batch's own ``positions`` on its first prompts."""
    from ..tasks.ioi import NAMES

    rows = list(range(min(N_ROWS, len(batch))))
    names = set(NAMES)

    def words_of(i):
        return model.to_str_tokens(batch.clean[i, : int(batch.end[i]) + 1])

    def attempt():
        return [find_positions(words_of(i), names) for i in rows]

    def verify(results):
        for i, got in zip(rows, results):
            want = {k: int(batch.positions[k][i]) for k in KEYS}
            if not isinstance(got, dict) or set(got) != set(KEYS):
                keys = sorted(got) if isinstance(got, dict) else type(got).__name__
                return f"return a dict with the keys {list(KEYS)}; got {keys}."
            try:
                got = {k: int(v) for k, v in got.items()}
            except (TypeError, ValueError):
                return "positions must be integers (indices into the token list)."
            if got == want:
                continue
            prompt, kind = batch.prompts[i], _template_kind(batch, i)
            if {k: got[k] + 1 for k in KEYS} == want:
                return (f"prompt {i}: every position is one less than the batch's: the token list starts with BOS at "
                        "position 0, so do not drop it (or add 1).")
            if got["IO"] == want["S1"] and got["S1"] == want["IO"]:
                return (f"prompt {i} ({kind}: {prompt!r}): IO and S1 are swapped. IO is the name said once, S the "
                        "name said twice; in ABBA prompts the IO name comes first.")
            if got["END"] != want["END"]:
                return (f"prompt {i}: END should be {want['END']} (the last token, where the answer is predicted), "
                        f"got {got['END']}.")
            wrong = [k for k in KEYS if got[k] != want[k]]
            return f"prompt {i} ({kind}: {prompt!r}): {', '.join(f'{k} = {got[k]}, expected {want[k]}' for k in wrong)}."
        return None

    kinds = sorted({_template_kind(batch, i) for i in rows})
    return quiet(run_check("IOI positions", attempt, verify,
                           success=f"IO, S1, S2 and END agree with the batch on {len(rows)} prompts "
                                   f"({' and '.join(kinds)} templates).",
                           hint="count how often each name occurs: the one seen twice is S (first = S1, second = "
                                "S2), the one seen once is IO; END = len(words) - 1"))


# ---------------------------------------------------------------------------------------------
# Exercise 2: the ABC corruption and the logit difference by hand


def _cases(model: HookedTransformer, batch) -> list[dict]:
    out = []
    for i in range(min(4, len(batch))):
        s2 = int(batch.positions["S2"][i])
        out.append({
            "row": i,
            "prompt": batch.prompts[i],
            "io": model.tokenizer.decode([int(batch.answer[i])]).strip(),
            "s": model.tokenizer.decode([int(batch.wrong[i])]).strip(),
            "new": model.tokenizer.decode([int(batch.corrupt[i, s2])]).strip(),
        })
    return out


@torch.no_grad()
def _ld(model: HookedTransformer, text: str, io: str, s: str, *, bos: bool = True) -> float:
    from ..tasks._common import word_id

    tokens = model.to_tokens(text, prepend_bos=bos)
    last = model(tokens)[0, -1]
    return float(last[word_id(model.tokenizer, io)] - last[word_id(model.tokenizer, s)])


def check_corrupted_logit_diff(corrupted_logit_diff: Callable, model: HookedTransformer, batch) -> CheckResult:
    """``corrupted_logit_diff(model, prompt, io, s, new_name)`` must return ``(corrupted_prompt,
    logit_diff)``: the prompt with S's second mention replaced by ``new_name`` (the ABC corruption), and
    logit(IO) - logit(S) at its last position, compared with the batch's corrupted prompts and
    :func:`circuitlib.metrics.logit_diff` on them."""
    from ..metrics import logit_diff

    cases = _cases(model, batch)
    with torch.no_grad():
        reference = logit_diff(model(batch.corrupt), batch, per_prompt=True)

    def attempt():
        return [corrupted_logit_diff(model, c["prompt"], c["io"], c["s"], c["new"]) for c in cases]

    def verify(results):
        for c, got in zip(cases, results):
            i = c["row"]
            try:
                text, value = got
                value = float(value)
            except (TypeError, ValueError):
                return f"return a pair (corrupted_prompt, logit_diff); got {type(got).__name__}."
            want_text, want = batch.corrupt_prompts[i], float(reference[i])
            if text != want_text:
                prompt, s, new = c["prompt"], c["s"], c["new"]
                if text == prompt.replace(s, new):
                    return f"prompt {i}: you replaced both mentions of {s!r}; replace only the second one (S2)."
                if text == prompt.replace(s, new, 1):
                    return (f"prompt {i}: you replaced the first mention of {s!r} (S1); the ABC corruption replaces "
                            "the second one (S2).")
                return f"prompt {i}: corrupted prompt {text!r}, expected {want_text!r}."
            if close(value, want, 1e-3):
                continue
            if close(value, -want, 1e-3):
                return f"prompt {i}: your logit difference has the wrong sign: it is logit(IO) - logit(S)."
            if close(value, _ld(model, text, c["io"], c["s"], bos=False), 1e-3):
                return (f"prompt {i}: you ran the prompt without BOS ({value:.3f}; with BOS {want:.3f}). The embedded "
                        "model always gets BOS first: model.to_tokens adds it.")
            if close(value, _ld(model, c["prompt"], c["io"], c["s"]), 1e-3):
                return f"prompt {i}: that is the clean prompt's logit difference; run the corrupted prompt."
            return f"prompt {i}: logit difference {value:.3f}, expected {want:.3f} (at the last position of the corrupted prompt)."
        return None

    return quiet(run_check("ABC corruption and logit difference", attempt, verify,
                           success=f"corrupted prompts and logit differences match the batch and "
                                   f"circuitlib.metrics.logit_diff on {len(cases)} prompts.",
                           hint="words = prompt.split(' '); replace the last word equal to s; "
                                "logits = model(model.to_tokens(text))[0, -1]; ids via "
                                "model.to_single_token(' ' + name)"))
