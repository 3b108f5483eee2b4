"""Tokenization helpers shared by the task and relation builders."""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence, TypeVar

import torch

from ..types import TaskBatch


def heldout(key: str, fraction: int = 5) -> bool:
    """Whether a (task, template, word) combination is held out of the embedded model's training.

    Deterministic (CRC32 of ``key``): one combination in ``fraction`` is held out.
    """
    return zlib.crc32(key.encode()) % fraction == 0


T = TypeVar("T")
MAX_DRAWS = 10_000  # rejection-sampling bound: a builder gives up (ValueError) after this many draws


def draw_until(draw: Callable[[], T], ok: Callable[[T], bool], *, error: str) -> T:
    """``draw()`` until ``ok`` holds, at most :data:`MAX_DRAWS` times; then ``ValueError(error)``
    (``error`` names the constraint that could not be met and what to do)."""
    for _ in range(MAX_DRAWS):
        x = draw()
        if ok(x):
            return x
    raise ValueError(f"{error} (no match in {MAX_DRAWS} random draws)")


K = TypeVar("K")


class SplitDraws:
    """Rejection sampling of one split's prompts for a builder whose held-out split is defined per
    (template, key) combination (IOI: the IO name; capitals: the country; Colored Objects: the surface).

    Checks ``split`` and, before any drawing, that each template the first ``n`` prompts use has a
    combination in the split (:class:`ValueError` otherwise); :meth:`draw` then draws until one is."""

    def __init__(self, split: str, templates: Sequence[str], n: int, keys: Sequence[K],
                 in_split: Callable[[str, K], bool], *, combos: str, keys_name: str, fix: str):
        if split not in ("heldout", "train", "any"):
            raise ValueError(f"unknown split {split!r}: use 'heldout', 'train' or 'any'")
        self.split, self.in_split, self.combos, self.keys_name, self.fix = split, in_split, combos, keys_name, fix
        self.n_keys = len(keys)
        self.eligible = {t: sum(in_split(t, k) for k in keys) for t in dict.fromkeys(templates)}
        for template in dict.fromkeys(templates[i % len(templates)] for i in range(min(n, len(templates)))):
            if not self.eligible[template]:
                raise ValueError(self.error(template))

    def error(self, template: str) -> str:
        seen = "never saw" if self.split == "heldout" else "saw"
        return (f"split={self.split!r} needs {self.combos} combinations the embedded model {seen} in training; "
                f"{self.eligible[template]} of the {self.n_keys} {self.keys_name} give one with template "
                f"{template!r}: {self.fix}")

    def draw(self, template: str, draw: Callable[[], T], key: Callable[[T], K]) -> T:
        """``draw()`` until the drawn prompt's key is in the split for ``template``."""
        return draw_until(draw, lambda x: self.in_split(template, key(x)), error=self.error(template))


def bos_id(tokenizer) -> int:
    """The BOS id circuitlib prepends (GPT-2 and the embedded model: ``<|endoftext|>``)."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to prepend")


def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else bos_id(tokenizer)


def encode(tokenizer, text: str, *, prepend_bos: bool = True) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [bos_id(tokenizer)] + list(ids) if prepend_bos else list(ids)


def word_id(tokenizer, word: str) -> int | None:
    """The id of ``" " + word`` if it is exactly one (known) token, else ``None`` (MAPS's filter)."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1:
        return None
    unk = tokenizer.unk_token_id
    # A word-level tokenizer maps every unknown word to one UNK token: that is not a hit.
    if unk is not None and ids[0] == unk and word != tokenizer.unk_token:
        return None
    return int(ids[0])


def single_token_words(tokenizer, words: list[str]) -> list[str]:
    return [w for w in words if word_id(tokenizer, w) is not None]


def batch_from_rows(
    tokenizer, rows: list[dict[str, Any]], *, task: str, model_name: str = "", meta: dict | None = None
) -> TaskBatch:
    """Tokenize prompt rows into a right-padded :class:`TaskBatch`.

    Each row has ``clean``, ``corrupt`` (texts), ``answer``, ``wrong`` (words with a leading space)
    and ``marks`` (position name -> word; the n-th repeat of a word takes its n-th occurrence), and
    optionally ``template`` (the prompt's template id -> :attr:`TaskBatch.template`; all rows or none).
    """
    if not rows:
        raise ValueError(f"no prompts to tokenize: ask the {task} builder for n >= 1 prompts")
    has_template = [("template" in row) for row in rows]
    if any(has_template) and not all(has_template):
        raise ValueError(
            f"{sum(has_template)} of {len(rows)} prompt rows carry a template id: give every row a "
            "'template' (or none), so TaskBatch.template has one id per prompt"
        )
    clean_ids, corrupt_ids, answers, wrongs = [], [], [], []
    positions: dict[str, list[int]] = {"END": []}
    for row in rows:
        c, k = encode(tokenizer, row["clean"]), encode(tokenizer, row["corrupt"])
        if len(c) != len(k):
            raise ValueError(
                f"clean and corrupt prompts tokenize to different lengths ({len(c)} vs {len(k)}): "
                f"{row['clean']!r} / {row['corrupt']!r}. Use words that are single tokens so the "
                "positions line up."
            )
        a = tokenizer.encode(row["answer"], add_special_tokens=False)
        w = tokenizer.encode(row["wrong"], add_special_tokens=False)
        if len(a) != 1 or len(w) != 1:
            raise ValueError(
                f"answer {row['answer']!r} / wrong answer {row['wrong']!r} must each be one token "
                "(with its leading space) for the logit difference to be defined"
            )
        seen: dict[int, int] = {}
        for name, word in row["marks"].items():
            tok = word_id(tokenizer, word)
            occ = [i for i, t in enumerate(c) if t == tok]
            nth = seen.get(tok, 0)
            if tok is None or nth >= len(occ):
                raise ValueError(f"cannot find {name}={word!r} in prompt {row['clean']!r}")
            positions.setdefault(name, []).append(occ[nth])
            seen[tok] = nth + 1
        positions["END"].append(len(c) - 1)
        clean_ids.append(c)
        corrupt_ids.append(k)
        answers.append(a[0])
        wrongs.append(w[0])
    seq = max(len(c) for c in clean_ids)
    pad = pad_id(tokenizer)

    def stack(seqs: list[list[int]]) -> torch.Tensor:
        return torch.tensor([s + [pad] * (seq - len(s)) for s in seqs], dtype=torch.long)

    return TaskBatch(
        task=task,
        clean=stack(clean_ids),
        corrupt=stack(corrupt_ids),
        answer=torch.tensor(answers),
        wrong=torch.tensor(wrongs),
        positions={k: torch.tensor(v) for k, v in positions.items()},
        prompts=[r["clean"] for r in rows],
        corrupt_prompts=[r["corrupt"] for r in rows],
        pad_id=pad,
        meta={"model": model_name, **(meta or {})},
        template=[str(r["template"]) for r in rows] if all(has_template) else None,
    )
