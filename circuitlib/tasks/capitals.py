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
from ._common import batch_from_rows, draw_until, word_id
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
    if split not in ("heldout", "train", "any"):
        raise ValueError(f"unknown split {split!r}: use 'heldout', 'train' or 'any'")
    rng = random.Random(seed)
    pairs = [
        (c, cap)
        for c, cap in country_capital_pairs()
        if word_id(tokenizer, c) is not None and word_id(tokenizer, cap) is not None
    ]
    if len(pairs) < 2:
        raise ValueError("fewer than 2 country/capital pairs are single tokens for this tokenizer")
    templates = templates or CAPITAL_TEMPLATES
    eligible = {t: sum(_in_split(t, c, split) for c, _ in pairs) for t in dict.fromkeys(templates)}
    for template in dict.fromkeys(templates[i % len(templates)] for i in range(min(n, len(templates)))):
        if not eligible[template]:
            raise ValueError(_split_error(template, split, 0, len(pairs)))
    rows = []
    for i in range(n):
        template = templates[i % len(templates)]
        (c, cap), (c2, cap2) = draw_until(
            lambda: rng.sample(pairs, 2), lambda two, t=template: _in_split(t, two[0][0], split),
            error=_split_error(template, split, eligible[template], len(pairs)))
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


def _split_error(template: str, split: Split, n_ok: int, n_pairs: int) -> str:
    seen = "never saw" if split == "heldout" else "saw"
    return (
        f"split={split!r} needs (country, template) combinations the embedded model {seen} in training; "
        f"{n_ok} of the {n_pairs} single-token country/capital pairs give one with template {template!r}: "
        "use a tokenizer that keeps more countries, other templates, or split='any'"
    )
