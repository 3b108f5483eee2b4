"""The few small types every part of circuitlib passes around.

- :class:`HeadScores` — one number per attention head (``[n_layers, n_heads]``) plus what it means.
- :class:`Circuit` — a set of ``(layer, head)`` pairs plus how it was chosen.
- :class:`TaskBatch` — clean / corrupted prompts as token ids with answers and positions.
- :class:`RelationPairs` — a relation's (source, target) token ids after the single-token filter.

All are plain dataclasses. ``HeadScores`` and ``Circuit`` round-trip through JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, TypeVar

import numpy as np
import torch
from jaxtyping import Int, Real
from torch import Tensor

Head = tuple[int, int]

#: What :class:`HeadScores` accepts as ``scores`` (a real ``[n_layers, n_heads]`` tensor or NumPy array);
#: it stores them as a float32 CPU tensor.
ScoreGrid = Real[Tensor, "n_layers n_heads"] | Real[np.ndarray, "n_layers n_heads"]


def head_name(head: Head) -> str:
    """``(15, 14)`` -> ``"15.14"``, the notation of the circuit literature."""
    return f"{head[0]}.{head[1]}"


def parse_head(text: str) -> Head:
    """``"15.14"`` -> ``(15, 14)``."""
    layer, head = text.split(".")
    return int(layer), int(head)


_J = TypeVar("_J", bound="_JsonRoundTrip")


class _JsonRoundTrip:
    """``to_json()`` / ``from_json(text)`` through the class's ``to_dict()`` / ``from_dict(data)``."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict())  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls: type[_J], text: str) -> _J:
        return cls.from_dict(json.loads(text))  # type: ignore[attr-defined]


@dataclass
class HeadScores(_JsonRoundTrip):
    """A score for every attention head.

    ``scores[l, h]`` is head ``h`` of layer ``l``. ``method`` names how the scores were made
    (e.g. ``"maps_static"``, ``"act_patch"``), ``target`` the relation or task, ``k`` the top-k
    used by MAPS-style scores (``None`` where it does not apply), ``meta`` anything else a reader
    needs to reproduce the numbers (ablation kind, number of prompts, ...). ``scores`` may be given as
    any real tensor or NumPy array (:data:`ScoreGrid`); it is stored as a float32 CPU tensor.
    """

    scores: ScoreGrid
    method: str
    target: str
    model: str
    k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.ndim != 2:
            raise ValueError(
                f"HeadScores.scores must be [n_layers, n_heads]; got shape {tuple(self.scores.shape)}"
            )

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def top(self, n: int, *, absolute: bool = False) -> list[Head]:
        """The ``n`` heads with the highest score (highest ``|score|`` with ``absolute``), best first."""
        values = self.scores.abs() if absolute else self.scores
        n = max(0, min(n, values.numel()))
        idx = torch.argsort(values.flatten(), descending=True, stable=True)[:n]
        return [(int(i) // self.n_heads, int(i) % self.n_heads) for i in idx]

    def __getitem__(self, head: Head) -> float:
        return float(self.scores[head[0], head[1]])

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "model": self.model,
            "k": self.k,
            "meta": self.meta,
            "scores": [[round(float(v), 6) for v in row] for row in self.scores],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadScores":
        return cls(
            scores=torch.tensor(data["scores"], dtype=torch.float32),
            method=data["method"],
            target=data["target"],
            model=data["model"],
            k=data.get("k"),
            meta=dict(data.get("meta", {})),
        )


@dataclass
class Circuit(_JsonRoundTrip):
    """A set of attention heads, with the task it is for and how it was chosen (``how``)."""

    heads: frozenset[Head]
    task: str
    model: str
    how: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = frozenset((int(l), int(h)) for l, h in self.heads)

    def __contains__(self, head: Head) -> bool:
        return tuple(head) in self.heads

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self):
        return iter(sorted(self.heads))

    def names(self) -> list[str]:
        return [head_name(h) for h in sorted(self.heads)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model,
            "how": self.how,
            "meta": self.meta,
            "heads": self.names(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Circuit":
        return cls(
            heads=frozenset(parse_head(h) for h in data["heads"]),
            task=data["task"],
            model=data["model"],
            how=data.get("how", ""),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def of(cls, heads: Iterable[Head | str], task: str, model: str, how: str = "") -> "Circuit":
        """Build from ``(layer, head)`` tuples or ``"L.H"`` strings."""
        parsed = [parse_head(h) if isinstance(h, str) else h for h in heads]
        return cls(heads=frozenset(parsed), task=task, model=model, how=how)


@dataclass
class TaskBatch:
    """Clean and corrupted prompts of one task, tokenized and aligned.

    Conventions: every row starts with BOS; rows are right-padded with ``pad_id`` so position ``p``
    means the same token slot in ``clean`` and ``corrupt``; ``positions["END"]`` is the last real
    token of each prompt (where the answer is read). Task-specific positions (IOI: ``IO``, ``S1``,
    ``S2``; Colored Objects: ``COLOR``, ``OBJ``, ``QOBJ``; capitals: ``COUNTRY``) index the same rows.
    ``answer`` / ``wrong`` are the correct and the competing next-token ids (IOI: IO vs S name; Colored
    Objects: the queried object's colour vs the colour of the object the corrupt prompt asks about;
    capitals: the capital vs the corrupt country's capital).
    ``template`` (optional): each prompt's template identifier (the task builders fill it with the
    template text, slots in brackets). In the builders' batches, prompts sharing an id have the same
    token count and the same tokens outside the template's slots (names, places, countries, ...), in
    clean and corrupt prompts alike: what per-position template means (Wang et al.'s mean ablation) need.
    """

    task: str
    clean: Int[Tensor, "batch seq"]
    corrupt: Int[Tensor, "batch seq"]
    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    positions: dict[str, Int[Tensor, " batch"]]
    prompts: list[str]
    corrupt_prompts: list[str]
    pad_id: int
    meta: dict[str, Any] = field(default_factory=dict)
    template: list[str] | None = None

    def __post_init__(self) -> None:
        if self.template is not None and len(self.template) != len(self):
            raise ValueError(
                f"template must give one id per prompt: got {len(self.template)} ids for {len(self)} prompts "
                "(pass template=None when the prompts have no templates)"
            )
        if self.clean.shape != self.corrupt.shape:
            raise ValueError(
                f"clean and corrupt token tensors must have the same shape (same prompts, same "
                f"positions); got {tuple(self.clean.shape)} vs {tuple(self.corrupt.shape)}. Build "
                "corruptions that keep every prompt's token count, or pad both to one length."
            )
        for name, pos in self.positions.items():
            if pos.shape != (len(self),):
                raise ValueError(f"positions[{name!r}] must have one entry per prompt")

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def end(self) -> Int[Tensor, " batch"]:
        return self.positions["END"]

    def __getitem__(self, idx: slice | Int[Tensor, " n"] | list[int]) -> "TaskBatch":
        """A sub-batch (rows ``idx``: a slice, row numbers), trimmed to the longest remaining prompt."""
        if isinstance(idx, slice):
            rows = list(range(len(self)))[idx]
        elif isinstance(idx, Tensor):
            if idx.dtype == torch.bool:
                raise TypeError("a TaskBatch takes row numbers, not a boolean mask: use batch[mask.nonzero().flatten()]")
            rows = idx.tolist()
        else:
            rows = list(idx)
        sel = torch.tensor(rows, dtype=torch.long)
        seq = int(self.positions["END"][sel].max()) + 1 if rows else 1
        return TaskBatch(
            task=self.task,
            clean=self.clean[sel, :seq],
            corrupt=self.corrupt[sel, :seq],
            answer=self.answer[sel],
            wrong=self.wrong[sel],
            positions={k: v[sel] for k, v in self.positions.items()},
            prompts=[self.prompts[i] for i in rows],
            corrupt_prompts=[self.corrupt_prompts[i] for i in rows],
            pad_id=self.pad_id,
            meta=dict(self.meta),
            template=None if self.template is None else [self.template[i] for i in rows],
        )


@dataclass
class RelationPairs:
    """A relation's pairs that survive the single-token filter (MAPS: ``" " + word`` encodes to one token).

    ``src`` / ``tgt`` are token ids, ``src_words`` / ``tgt_words`` the words they came from, ``total``
    the number of pairs in the data file, ``dropped`` the pairs the filter removed, ``k`` the
    default top-k for MAPS scores of this relation (1 for copying relations, 10 otherwise).
    """

    name: str
    src: Int[Tensor, " n_pairs"]
    tgt: Int[Tensor, " n_pairs"]
    src_words: list[str]
    tgt_words: list[str]
    total: int
    dropped: list[tuple[str, str]]
    k: int

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @property
    def kept(self) -> int:
        return len(self)
