"""Indirect object identification (IOI), after Wang et al. 2022.

"When Mary and John went to the store, John gave a drink to" -> " Mary". The IO (indirect object)
is the name that appears once; S (subject) appears twice (S1, S2). Templates: the 15 BABA
templates of Wang et al. and their 15 ABBA twins (first two names swapped); batches alternate them
(BABA 1, ABBA 1, BABA 2, ABBA 2, ...), so any two consecutive prompts hold one of each. Corruptions:
``"ABC"`` (the S2 name replaced by a third name) and ``"flip"`` (S2 replaced by the IO name), both
keeping every prompt's token count so clean and corrupt positions line up.
"""

from __future__ import annotations

import random
from typing import Literal

from ..types import TaskBatch
from ._common import SplitDraws, batch_from_rows, heldout, single_token_words

BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]


def _abba(template: str) -> str:
    """Swap the first [B] and the first [A] (Wang et al.'s construction of the ABBA templates)."""
    i, j = template.index("[B]"), template.index("[A]")
    return template[:i] + "[A]" + template[i + 3 : j] + "[B]" + template[j + 3 :]


ABBA_TEMPLATES = [_abba(t) for t in BABA_TEMPLATES]
TEMPLATES = BABA_TEMPLATES + ABBA_TEMPLATES  # the embedded model's corpus draws from this list (order kept)
ALTERNATING = [t for pair in zip(BABA_TEMPLATES, ABBA_TEMPLATES) for t in pair]  # ioi_batch's default order

NAMES = (
    "Aaron Adam Alan Alex Alice Amy Anderson Andre Andrew Andy Anna Anthony Arthur Austin Blake "
    "Brandon Brian Carter Charles Charlie Christian Christopher Clark Cole Collins Connor Crew "
    "Crystal Daniel David Dean Edward Elizabeth Emily Eric Eva Ford Frank George Georgia Graham "
    "Grant Henry Ian Jack Jacob Jake James Jamie Jane Jason Jay Jennifer Jeremy Jessica John "
    "Jonathan Jordan Joseph Joshua Justin Kate Kelly Kevin Kyle Laura Leon Lewis Lisa Louis Luke "
    "Madison Marco Marcus Maria Mark Martin Mary Matthew Max Michael Michelle Morgan Patrick Paul "
    "Peter Prince Rachel Richard River Robert Roman Rose Ruby Russell Ryan Sarah Scott Sean Simon "
    "Stephen Steven Sullivan Taylor Theresa Thomas Tyler Victoria Warren William"
).split()
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

Corruption = Literal["ABC", "flip"]
Split = Literal["heldout", "train", "any"]


def fill(template: str, a: str, b: str, place: str, obj: str) -> str:
    """The prompt text: template with names/place/object filled, the final IO name cut off."""
    prompt = template.rsplit(" [A]", 1)[0]
    return (
        prompt.replace("[A]", a).replace("[B]", b).replace("[PLACE]", place).replace("[OBJECT]", obj)
    )


def ioi_batch(
    tokenizer,
    n: int = 64,
    *,
    corruption: Corruption = "ABC",
    seed: int = 0,
    names: list[str] | None = None,
    templates: list[str] | None = None,
    split: Split = "heldout",
    model_name: str = "",
) -> TaskBatch:
    """``n`` IOI prompts with their corruptions.

    Templates: by default BABA and ABBA alternate (:data:`ALTERNATING`: BABA 1, ABBA 1, BABA 2, ...,
    so every batch of >= 2 consecutive prompts holds both orders); a ``templates`` list is cycled in
    its own order. ``TaskBatch.template`` holds each prompt's template.
    Names, places and objects are filtered to words that are one token (with a leading space) in
    ``tokenizer``. ``answer`` is the IO name, ``wrong`` the S name. Positions: ``IO`` and ``S1``
    (first clause), ``S2`` (second mention of S), ``END`` (last prompt token). BOS is prepended.
    ``split``: ``"heldout"`` draws only (template, IO name) combinations that the embedded model never
    saw in training, ``"train"`` only seen ones, ``"any"`` both; a template without any such IO name
    among ``names`` is one ``ValueError``.
    """
    if corruption not in ("ABC", "flip"):
        raise ValueError(f"unknown IOI corruption {corruption!r}: use 'ABC' or 'flip'")
    rng = random.Random(seed)
    name_pool = single_token_words(tokenizer, names or NAMES)
    places = single_token_words(tokenizer, PLACES)
    objects = single_token_words(tokenizer, OBJECTS)
    if len(name_pool) < 3 or not places or not objects:
        raise ValueError(
            "the tokenizer keeps fewer than 3 single-token names (or no place/object): IOI needs "
            "names that encode to one token with a leading space"
        )
    templates = templates or ALTERNATING
    draws = SplitDraws(split, templates, n, name_pool, lambda t, a: _in_split(t, a, split), combos="(template, IO name)",
                       keys_name="single-token names", fix="pass more names, other templates, or split='any'")
    rows = []
    for i in range(n):
        template = templates[i % len(templates)]
        a, b, c = draws.draw(template, lambda: rng.sample(name_pool, 3), lambda abc: abc[0])
        place, obj = rng.choice(places), rng.choice(objects)
        # Corrupt S2 only: ABC puts a third name there, flip puts the IO name there.
        marked = fill(_mark_s2(template), a, b, place, obj)
        clean = marked.replace("[S2]", b)
        corrupt = marked.replace("[S2]", c if corruption == "ABC" else a)
        rows.append(
            dict(
                clean=clean,
                corrupt=corrupt,
                answer=" " + a,
                wrong=" " + b,
                marks={"IO": a, "S1": b, "S2": b},
                template=template,
            )
        )
    meta = {"corruption": corruption, "seed": seed, "split": split}
    return batch_from_rows(tokenizer, rows, task="ioi", model_name=model_name, meta=meta)


def _in_split(template: str, io_name: str, split: Split) -> bool:
    return split == "any" or heldout(f"ioi:{template}:{io_name}") == (split == "heldout")


def _mark_s2(template: str) -> str:
    """Replace the second [B] (the S2 mention) with [S2]."""
    first = template.index("[B]")
    second = template.index("[B]", first + 3)
    return template[:second] + "[S2]" + template[second + 3 :]

