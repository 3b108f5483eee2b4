"""The 20 MAPS relation datasets and MAPS's single-token filter.

Data: ``circuitlib/tasks/data/relations/<name>.json`` (lists of ``[source, target]``), copied with
their provenance (``PROVENANCE.md``, ``<name>.source.txt``) from the MAPS release (Elhelo & Geva 2024).

Filter (exactly MAPS's): prepend a space to both words and keep the pair only if each side encodes
to a single token (for a word-level tokenizer, a known word). A relation with fewer than
``min_pairs`` (default 30) surviving pairs is invalid for that tokenizer.
Default top-k: 1 for copying relations (:data:`COPYING_RELATIONS`), 10 otherwise.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from ..types import RelationPairs
from ._common import word_id

DATA_DIR = Path(__file__).parent / "data" / "relations"
COPYING_RELATIONS = frozenset({"name_copying", "general_copying_english_500"})
MIN_PAIRS = 30


class RelationError(ValueError):
    """A relation is unknown or has too few single-token pairs for the tokenizer in use."""


def relation_names() -> list[str]:
    """All shipped relations, sorted."""
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def _read(name: str) -> tuple[tuple[str, str], ...]:
    path = DATA_DIR / f"{name}.json"
    if not path.exists():
        raise RelationError(f"unknown relation {name!r}; known relations: {', '.join(relation_names())}")
    return tuple((str(s), str(t)) for s, t in json.loads(path.read_text()))


def read_relation(name: str) -> list[tuple[str, str]]:
    """The raw (source, target) word pairs of a relation, unfiltered, in file order."""
    return list(_read(name))


def default_k(name: str) -> int:
    """MAPS's top-k: 1 for copying relations, 10 for all others."""
    return 1 if name in COPYING_RELATIONS else 10


def load_relation(name: str, tokenizer, *, min_pairs: int = MIN_PAIRS, check: bool = True) -> RelationPairs:
    """A relation's single-token pairs for ``tokenizer`` (see module docstring for the filter).

    Raises :class:`RelationError` naming the counts when fewer than ``min_pairs`` survive (unless
    ``check=False``, e.g. to report the counts).
    """
    raw = read_relation(name)
    src, tgt, sw, tw, dropped = [], [], [], [], []
    for s, t in raw:
        si, ti = word_id(tokenizer, s), word_id(tokenizer, t)
        if si is None or ti is None:
            dropped.append((s, t))
            continue
        src.append(si), tgt.append(ti), sw.append(s), tw.append(t)
    pairs = RelationPairs(
        name=name,
        src=torch.tensor(src, dtype=torch.long),
        tgt=torch.tensor(tgt, dtype=torch.long),
        src_words=sw,
        tgt_words=tw,
        total=len(raw),
        dropped=dropped,
        k=default_k(name),
    )
    if check and len(pairs) < min_pairs:
        raise RelationError(
            f"relation {name!r} keeps {len(pairs)} of {len(raw)} pairs as single tokens for this "
            f"tokenizer, fewer than the {min_pairs} MAPS requires; pass min_pairs=... to lower the "
            "threshold or choose another relation (`python -m circuitlib relations` lists them)."
        )
    return pairs


def relation_table(tokenizer, *, min_pairs: int = MIN_PAIRS) -> list[dict]:
    """Per relation: pairs kept / total and whether it is valid for ``tokenizer``."""
    rows = []
    for name in relation_names():
        p = load_relation(name, tokenizer, check=False)
        rows.append({"relation": name, "kept": len(p), "total": p.total, "k": p.k,
                     "valid": len(p) >= min_pairs})
    return rows
