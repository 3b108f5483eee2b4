"""Name copying: a list of names said twice, cut before its last name.

" Mary John Anna , Mary John" -> " Anna". The answer is a name already in the context, so a head that
copies names (maps a name's embedding to the same name's logit, what MAPS's ``name_copying``
relation scores) and attends to it from the last position moves it to the output. This is the task
the name-copying causal check ablates heads on.

Corruption: the *first* mention of the answer replaced by another name, which becomes the wrong
answer; clean and corrupt prompts differ in that one token. Lists hold 2 to 5 names (all distinct).
Prompts start with a space, so every name, the first one too, is the same single token (``" Mary"``)
at both of its mentions (GPT-2 encodes a text-initial ``"Mary"`` as another token).
The embedded model was trained on random word lists said twice, so practically every name list here
is unseen; there is no train / held-out split.
"""

from __future__ import annotations

import random
import re

from ..types import TaskBatch
from ._common import batch_from_rows, single_token_words
from .ioi import NAMES


def copy_names() -> list[str]:
    """IOI names plus the one-word names of the MAPS name-copying relation, sorted, no duplicates."""
    from .relations import read_relation

    extra = [a for a, _ in read_relation("name_copying") if re.fullmatch(r"[A-Z][a-z]+", a)]
    return sorted(set(NAMES) | set(extra))


def list_template(size: int) -> str:
    """The template id of a list of ``size`` names said twice and cut before its last name."""
    slots = [f"[N{j}]" for j in range(1, size + 1)]
    return " ".join([*slots, ","] + slots[:-1])


def copying_batch(
    tokenizer,
    n: int = 64,
    *,
    seed: int = 0,
    lengths: tuple[int, int] = (2, 5),
    names: list[str] | None = None,
    model_name: str = "",
) -> TaskBatch:
    """``n`` name-list repeats, each list ``lengths[0]..lengths[1]`` names long (cycled through).

    ``answer`` is the list's last name, ``wrong`` the name the corrupt prompt puts in its place.
    Positions: ``FIRST`` (the answer's first mention, the token a copying head reads) and ``END``.
    Names are filtered to single tokens (with a leading space) in ``tokenizer``. BOS is prepended.
    ``TaskBatch.template`` holds each prompt's list shape, e.g. ``"[N1] [N2] [N3] , [N1] [N2]"``
    (prompts of one length share it: same token count, the comma at the same position).
    """
    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"list lengths {lengths!r} must satisfy 1 <= min <= max")
    rng = random.Random(seed)
    pool = single_token_words(tokenizer, names or copy_names())
    if len(pool) < hi + 1:
        raise ValueError(
            f"the tokenizer keeps {len(pool)} single-token names; lists of {hi} need at least {hi + 1}"
        )
    rows = []
    for i in range(n):
        size = lo + i % (hi - lo + 1)
        *context, answer, other = rng.sample(pool, size + 1)
        rows.append(
            dict(
                clean=" " + " ".join([*context, answer, ","] + context),
                corrupt=" " + " ".join([*context, other, ","] + context),
                answer=" " + answer,
                wrong=" " + other,
                marks={"FIRST": answer},
                template=list_template(size),
            )
        )
    meta = {"corruption": "other name at the answer's first mention", "seed": seed, "lengths": [lo, hi]}
    return batch_from_rows(tokenizer, rows, task="copying", model_name=model_name, meta=meta)
