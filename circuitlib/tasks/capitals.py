"""Country -> capital prompts: "The capital of France is" -> " Paris".

Countries and capitals are the single-word pairs of the MAPS ``country_to_capital_wikidata``
relation, filtered to words that are one token (with a leading space) in the tokenizer in use.
Corruption: the same template with another country; the wrong answer is that country's capital.
"""

from __future__ import annotations

import random
import re
import zlib

from ..types import TaskBatch
from ._common import SplitDraws, batch_from_rows, word_id
from .ioi import Split

CAPITAL_TEMPLATES = [
    "The capital of [C] is",
    "The capital city of [C] is",
    "In [C], the capital is",
    "Q: What is the capital of [C]? A:",
    "The government of [C] sits in",
]


def country_capital_pairs() -> list[tuple[str, str]]:
    """The one-word (country, capital) pairs of the MAPS Wikidata relation, in file order."""
    from .relations import read_relation

    return [
        (c, cap)
        for c, cap in read_relation("country_to_capital_wikidata")
        if re.fullmatch(r"[A-Za-z]+", c) and re.fullmatch(r"[A-Za-z]+", cap) and c != cap
    ]


def heldout_template(country: str) -> str:
    """Each country has exactly one template it is never trained on (chosen by CRC32)."""
    return CAPITAL_TEMPLATES[zlib.crc32(f"capital:{country}".encode()) % len(CAPITAL_TEMPLATES)]


def capital_batch(
    tokenizer,
    n: int = 64,
    *,
    seed: int = 0,
    templates: list[str] | None = None,
    split: Split = "heldout",
    model_name: str = "",
) -> TaskBatch:
    """``n`` country -> capital prompts with corruptions (another country, same template).

    ``answer`` is the capital, ``wrong`` the corrupt country's capital; positions ``COUNTRY`` and
    ``END``. BOS is prepended. Templates are cycled in order; ``TaskBatch.template`` holds each
    prompt's. ``split="heldout"`` draws only (country, template) combinations the embedded model never
    saw in training; ``"train"`` only seen ones; ``"any"`` both (templates of one's own have no
    training split: any country goes). A template without any such country among the tokenizer's
    single-token pairs is one ``ValueError``.
    """
    rng = random.Random(seed)
    pairs = [
        (c, cap)
        for c, cap in country_capital_pairs()
        if word_id(tokenizer, c) is not None and word_id(tokenizer, cap) is not None
    ]
    if len(pairs) < 2:
        raise ValueError("fewer than 2 country/capital pairs are single tokens for this tokenizer")
    templates = templates or CAPITAL_TEMPLATES
    draws = SplitDraws(split, templates, n, [c for c, _ in pairs], lambda t, c: _in_split(t, c, split),
                       combos="(country, template)", keys_name="single-token country/capital pairs",
                       fix="use a tokenizer that keeps more countries, other templates, or split='any'")
    rows = []
    for i in range(n):
        template = templates[i % len(templates)]
        (c, cap), (c2, cap2) = draws.draw(template, lambda: rng.sample(pairs, 2), lambda two: two[0][0])
        rows.append(
            dict(
                clean=template.replace("[C]", c),
                corrupt=template.replace("[C]", c2),
                answer=" " + cap,
                wrong=" " + cap2,
                marks={"COUNTRY": c},
                template=template,
            )
        )
    meta = {"corruption": "other country", "seed": seed, "split": split}
    return batch_from_rows(tokenizer, rows, task="capitals", model_name=model_name, meta=meta)


def _in_split(template: str, country: str, split: Split) -> bool:
    # Templates of one's own have no training split: any country goes.
    if split == "any" or template not in CAPITAL_TEMPLATES:
        return True
    return (heldout_template(country) == template) == (split == "heldout")


