"""Colored Objects (Merullo et al. 2024, after Ippolito & Callison-Burch 2023): "On the desk I see a red
pen, a blue cup and a green book. What color is the cup? Answer:" -> " blue".

Three (colour, object) pairs on a surface, then a question about one of the objects. Colours, objects
and surfaces are single tokens (with a leading space) in the tokenizer in use (the embedded model's and
GPT-2's keep all of them); the three colours and the three objects of a prompt are distinct.
Corruption: the question asks about another object of the same list (one token changes), whose colour
is the wrong answer, so clean and corrupt prompts line up token by token.
Positions: ``COLOR`` (the queried object's colour in the list), ``OBJ`` (the queried object in the list),
``QOBJ`` (the object in the question), ``END``.

Held-out split (the embedded model's test set): each template has one surface it is never trained with
(:func:`heldout_surface`). Colours, objects and the queried position are not part of the key on purpose:
every (object, colour) pair occurs in training in every list position, so memorising which colour an
object tends to have, or which position tends to be asked, neither helps nor hurts on the held-out split;
only reading the colour off the context does.
"""

from __future__ import annotations

import random
import zlib

from ..types import TaskBatch
from ._common import SplitDraws, batch_from_rows, single_token_words
from .ioi import Split

COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "brown", "grey", "pink"]
ITEMS = ["pen", "cup", "book", "ball", "key", "hat", "phone", "plate", "lamp", "box", "bag", "shoe",
         "bottle", "clock", "spoon", "candle"]
SURFACES = ["desk", "table", "floor", "shelf", "bed", "counter"]

COLORED_TEMPLATES = [
    "On the [S] I see a [C1] [O1], a [C2] [O2] and a [C3] [O3]. What color is the [Q]? Answer:",
    "On the [S] there is a [C1] [O1], a [C2] [O2] and a [C3] [O3]. What color is the [Q]? Answer:",
    "I put a [C1] [O1], a [C2] [O2] and a [C3] [O3] on the [S]. The [Q] is",
    "There is a [C1] [O1], a [C2] [O2] and a [C3] [O3] on the [S]. Q: What color is the [Q]? A:",
]


def heldout_surface(template: str) -> str:
    """The one surface each template is never trained with (CRC32 of the template picks it).

    Colours, objects and the queried list position are uniform on both splits, so neither an
    object -> colour nor a position prior can help on the held-out prompts. (A first key, (template,
    surface, queried position), left each (template, surface) with a position prior that put held-out
    accuracy below chance.)"""
    return SURFACES[zlib.crc32(template.encode()) % len(SURFACES)]


def is_heldout(template: str, surface: str) -> bool:
    """Whether (template, surface) is held out of the embedded model's training corpus."""
    return surface == heldout_surface(template)


def fill_colored(template: str, surface: str, colors: list[str], objects: list[str], query: str) -> str:
    """``template`` with its surface, three (colour, object) pairs and the queried object filled in."""
    text = template.replace("[S]", surface).replace("[Q]", query)
    for i, (c, o) in enumerate(zip(colors, objects), start=1):
        text = text.replace(f"[C{i}]", c).replace(f"[O{i}]", o)
    return text


def sample_colored(rng: random.Random, colors: list[str], items: list[str], surfaces: list[str],
                   templates: list[str], template: str | None = None):
    """One random prompt: (template, surface, 3 distinct colours, 3 distinct objects, queried index)."""
    template = template or rng.choice(templates)
    cs = rng.sample(colors, 3)
    os_ = rng.sample(items, 3)
    return template, rng.choice(surfaces), cs, os_, rng.randrange(3)


def colored_objects_batch(
    tokenizer,
    n: int = 64,
    *,
    seed: int = 0,
    templates: list[str] | None = None,
    split: Split = "heldout",
    model_name: str = "",
) -> TaskBatch:
    """``n`` Colored Objects prompts with corruptions (the question asks about another listed object).

    ``answer`` is the queried object's colour, ``wrong`` the colour of the object the corrupt prompt
    asks about. BOS is prepended. Templates are cycled in order; ``TaskBatch.template`` holds each
    prompt's. ``split="heldout"`` draws only (template, surface) combinations the
    embedded model never saw in training; ``"train"`` only seen ones; ``"any"`` both (templates of
    one's own have no training split). A template without any such combination among the tokenizer's
    single-token surfaces is one ``ValueError``.
    """
    rng = random.Random(seed)
    colors = single_token_words(tokenizer, COLORS)
    items = single_token_words(tokenizer, ITEMS)
    surfaces = single_token_words(tokenizer, SURFACES)
    if len(colors) < 3 or len(items) < 3 or not surfaces:
        raise ValueError(
            f"the tokenizer keeps {len(colors)} single-token colours, {len(items)} objects and {len(surfaces)} "
            "surfaces: Colored Objects needs >= 3 colours and objects and one surface that encode to one token "
            "with a leading space"
        )
    templates = templates or COLORED_TEMPLATES
    draws = SplitDraws(split, templates, n, [(s, q) for s in surfaces for q in range(3)],
                       lambda t, key: _in_split(t, *key, split), combos="(template, surface)",
                       keys_name="(single-token surface, position) combinations",
                       fix="use a tokenizer that keeps more surfaces, other templates, or split='any'")
    rows = []
    for i in range(n):
        template = templates[i % len(templates)]
        _, surface, cs, os_, q = draws.draw(
            template, lambda t=template: sample_colored(rng, colors, items, surfaces, templates, t), lambda x: (x[1], x[4]))
        other = rng.choice([j for j in range(3) if j != q])
        rows.append(
            dict(
                clean=fill_colored(template, surface, cs, os_, os_[q]),
                corrupt=fill_colored(template, surface, cs, os_, os_[other]),
                answer=" " + cs[q],
                wrong=" " + cs[other],
                marks={"COLOR": cs[q], "OBJ": os_[q], "QOBJ": os_[q]},
                template=template,
            )
        )
    meta = {"corruption": "question about another listed object", "seed": seed, "split": split}
    return batch_from_rows(tokenizer, rows, task="colored_objects", model_name=model_name, meta=meta)


def _in_split(template: str, surface: str, q: int, split: Split) -> bool:
    # Templates of one's own have no training split: anything goes.
    if split == "any" or template not in COLORED_TEMPLATES:
        return True
    return is_heldout(template, surface) == (split == "heldout")
