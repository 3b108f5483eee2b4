"""The synthetic corpus the embedded model is trained on, and its word-level tokenizer.

Ten kinds of sentence, mixed with fixed proportions (:data:`MIX`, or ``generate(mix=...)``) and a fixed seed:

- ``ioi``: the 30 IOI templates of Wang et al. filled with names / places / objects and ending in
  the IO name ("... John gave a drink to Mary"). (template, IO name) combinations that
  :func:`circuitlib.tasks._common.heldout` marks are never generated: they are the test set.
- ``capital``: "The capital of France is Paris" in five templates; each country's held-out template
  (:func:`circuitlib.tasks.capitals.heldout_template`) is never generated.
- ``colored``: Colored Objects prompts ("On the desk I see a red pen, a blue cup and a green book. What
  color is the cup? Answer: blue", :mod:`circuitlib.tasks.colored_objects`); each template's held-out
  surface (:func:`circuitlib.tasks.colored_objects.heldout_surface`) is never generated with it (colours,
  objects and the queried position are not in the key: every object-colour pair is trained in every position).
- ``lookup0``: colour-object recall, "red pen blue cup : cup blue pen red" (the lookup at the object itself).
- ``gap1`` / ``gap2`` / ``gap3``: the same recall with 1-3 tokens (the question's own tail) between the
  queried object and its colour: "red pen blue cup : cup ? Answer : blue" (``gap3``).
- ``lookup``: a Colored Objects list, then two "The cup is blue" answers, on surfaces no template holds out.
  These, in the gated stages of :data:`STAGES` that move the queried object away from its answer one token
  at a time, are the curriculum that lets the in-context lookup form (without a curriculum Colored Objects
  stayed at chance: the model copied all listed colours; with a fixed-fraction warm-up it formed in one seed
  of three).
- ``copy``: a short random word list said twice ("Mary Paris ring Kabul , Mary Paris ring Kabul").
- ``filler``: neutral sentences ("This is a document about Mary", "Mary likes the garden").

The vocabulary is every word these generators can emit, plus ``<|endoftext|>`` (BOS/EOS/PAD) and
``[UNK]``; punctuation is split off as its own token ("?" included), spaces carry no information.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..tasks._common import heldout
from ..tasks.capitals import CAPITAL_TEMPLATES, country_capital_pairs, heldout_template
from ..tasks.colored_objects import COLORED_TEMPLATES, COLORS, ITEMS, SURFACES, fill_colored, heldout_surface, is_heldout, sample_colored
from ..tasks.copying import copy_names
from ..tasks.ioi import OBJECTS, PLACES, TEMPLATES, fill

SPECIALS = ["<|endoftext|>", "[UNK]"]
FILLER_TEMPLATES = [
    "This is a document about [X]",
    "[N] likes the [PLACE]",
    "[N] has a [OBJECT]",
    "We talked about [X] today",
]
KINDS = ("ioi", "capital", "colored", "lookup", "lookup0", "gap1", "gap2", "gap3", "copy", "filler")
# The main run's mix (after the stages).
MIX = {"ioi": 0.25, "capital": 0.15, "colored": 0.25, "lookup": 0.10, "lookup0": 0.10, "copy": 0.10, "filler": 0.05}
# The gated curriculum before the main run (train.py): each stage samples from its own mix until the
# last-token accuracy of unseen sentences of its ``gate`` kind reaches ``acc``, or for at most ``max`` steps.
# The queried object moves away from its answer one token at a time (lookup0 -> gap1 -> gap2 -> gap3 -> the
# question); ``copy`` in the first two stages makes the previous-token head carry any token, not only colours
# (without it seed 2 never passed gap1 in 800 steps); IOI in every stage keeps IOI learnable afterwards (without
# it seed 0 never learned IOI). Session 7's R17: all three tasks on seeds 0-2, but 5, 5 and 6 of 9 floors (EXPERIMENTS.md).
STAGES = [
    {"mix": {"lookup0": 0.5, "copy": 0.3, "colored": 0.2, "ioi": 0.25}, "gate": "lookup0", "acc": 0.95, "max": 1000},
    {"mix": {"lookup0": 0.2, "gap1": 0.6, "copy": 0.2, "ioi": 0.25}, "gate": "gap1", "acc": 0.9, "max": 1500},
    {"mix": {"lookup0": 0.2, "gap1": 0.2, "gap2": 0.6, "ioi": 0.25}, "gate": "gap2", "acc": 0.9, "max": 800},
    {"mix": {"lookup0": 0.2, "gap2": 0.2, "gap3": 0.6, "ioi": 0.25}, "gate": "gap3", "acc": 0.9, "max": 800},
    {"mix": {"gap3": 0.3, "colored": 0.5, "lookup": 0.2, "ioi": 0.25}, "gate": "colored", "acc": 0.9, "max": 1000},
]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


def vocabulary() -> list[str]:
    """All tokens of the embedded model, specials first, the rest sorted (ids are stable)."""
    words: set[str] = set(copy_names()) | set(PLACES) | set(OBJECTS) | set(COLORS) | set(ITEMS) | set(SURFACES)
    for c, cap in country_capital_pairs():
        words |= {c, cap}
    for t in TEMPLATES + CAPITAL_TEMPLATES + FILLER_TEMPLATES + COLORED_TEMPLATES:
        words |= {w for w in _words(t) if w not in ("A", "B", "PLACE", "OBJECT", "C", "X", "N", "S", "Q",
                                                    "C1", "C2", "C3", "O1", "O2", "O3")}
    words |= {",", "[", "]", "?", "Q", "A"}
    words -= set(SPECIALS)
    return SPECIALS + sorted(words)


def build_tokenizer():
    """The embedded model's word-level tokenizer (``transformers`` fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ..models import wrap_tokenizer

    vocab = {w: i for i, w in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return wrap_tokenizer(backend, unk="[UNK]")


@dataclass
class Sentence:
    text: str
    kind: str


def generate(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[Sentence]:
    """``n`` training sentences, mixed as :data:`MIX` (or ``mix``: kind of :data:`KINDS` -> weight, normalised
    by ``random.choices``; kinds left out are not generated), never containing a held-out combination."""
    rng = random.Random(seed)
    names = copy_names()
    pairs = country_capital_pairs()
    anything = names + [w for p in pairs for w in p] + PLACES + OBJECTS
    mix = MIX if mix is None else mix
    if not mix or set(mix) - set(KINDS) or any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
        raise ValueError(f"mix {mix!r}: give non-negative weights (not all zero) for kinds among {KINDS}")
    kinds, weights = zip(*mix.items())
    held = set(map(heldout_surface, COLORED_TEMPLATES))
    open_surfaces = [x for x in SURFACES if x not in held]  # surfaces no Colored Objects template holds out
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "ioi":
            while True:
                template = rng.choice(TEMPLATES)
                a, b = rng.sample(names, 2)
                if not heldout(f"ioi:{template}:{a}"):
                    break
            text = fill(template, a, b, rng.choice(PLACES), rng.choice(OBJECTS)) + " " + a
        elif kind == "capital":
            while True:
                country, capital = rng.choice(pairs)
                template = rng.choice(CAPITAL_TEMPLATES)
                if template != heldout_template(country):
                    break
            text = template.replace("[C]", country) + " " + capital
        elif kind == "colored":
            while True:
                template, surface, cs, os_, q = sample_colored(rng, COLORS, ITEMS, SURFACES, COLORED_TEMPLATES)
                if not is_heldout(template, surface):
                    break
            text = fill_colored(template, surface, cs, os_, os_[q]) + " " + cs[q]
        elif kind == "lookup0":
            # Colour-object recall, the lookup at the queried object itself: "red pen blue cup : cup blue pen red"
            k = rng.randint(2, 4)
            cs, os_ = rng.sample(COLORS, k), rng.sample(ITEMS, k)
            order = rng.sample(range(k), k)
            text = " ".join(f"{c} {o}" for c, o in zip(cs, os_)) + " : " + " ".join(f"{os_[j]} {cs[j]}" for j in order)
        elif kind in ("gap1", "gap2", "gap3"):
            # Recall with a gap of 1-3 tokens (the question's own tail) between the queried object and its
            # colour: "red pen blue cup green book : cup ? Answer : blue" (gap3)
            k = rng.randint(2, 4)
            cs, os_ = rng.sample(COLORS, k), rng.sample(ITEMS, k)
            j = rng.randrange(k)
            gap = {"gap1": " :", "gap2": " Answer :", "gap3": " ? Answer :"}[kind]
            text = " ".join(f"{c} {o}" for c, o in zip(cs, os_)) + f" : {os_[j]}{gap} {cs[j]}"
        elif kind == "lookup":
            # A Colored Objects list, then two "The <object> is <colour>" answers (surfaces no template holds out)
            surface = rng.choice(open_surfaces)
            cs, os_ = rng.sample(COLORS, 3), rng.sample(ITEMS, 3)
            qs = rng.sample(range(3), 2)
            text = (f"On the {surface} I see a {cs[0]} {os_[0]} , a {cs[1]} {os_[1]} and a {cs[2]} {os_[2]} . "
                    + " . ".join(f"The {os_[j]} is {cs[j]}" for j in qs))
        elif kind == "copy":
            words = rng.sample(anything, rng.randint(2, 5))
            text = " ".join(words) + " , " + " ".join(words)
        else:
            template = rng.choice(FILLER_TEMPLATES)
            text = (
                template.replace("[X]", rng.choice(anything)).replace("[N]", rng.choice(names))
                .replace("[PLACE]", rng.choice(PLACES)).replace("[OBJECT]", rng.choice(OBJECTS))
            )
        out.append(Sentence(text, kind))
    return out
