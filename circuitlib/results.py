"""The base of circuitlib's experiment results: small dataclasses that turn into JSON.

Every experiment (a faithfulness measurement, a causal check, a comparison, a test table) returns a
dataclass deriving from :class:`Result`: its fields are documented where it is defined, ``to_dict()``
gives plain JSON-able Python (tensors become lists, heads ``"L.H"``), ``to_json()`` the text.
Single statistics (a rank correlation, a set overlap) derive from :class:`MappingResult`: they also
read as the mapping of their ``to_dict()`` (``r["p_value"]``, ``r.get("note")``), as the plain dicts
they replaced did.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch


def jsonable(value: Any) -> Any:
    """Plain Python for JSON: dataclasses and dicts recursively, tensors / numpy arrays as lists,
    NaN as ``None``, head tuples as ``"L.H"`` strings where they appear as dict keys."""
    import numpy as np

    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {(f"{k[0]}.{k[1]}" if isinstance(k, tuple) else str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return jsonable(value.item())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class Result:
    """Mixin for result dataclasses: ``to_dict()`` / ``to_json()``; ``r["field"]`` reads a field.

    ``_optional`` names fields that ``to_dict()`` leaves out while they are ``None`` (e.g. a ``note``
    that only an undefined statistic has), so the JSON holds only what applies.
    """

    _optional: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(value) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if (value := getattr(self, f.name)) is not None or f.name not in self._optional}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


class MappingResult(Result, Mapping):
    """A result that is also the read-only mapping of its ``to_dict()``: ``r["p_value"]``,
    ``r.get("note")``, ``"note" in r``, ``dict(r)``. For single statistics whose callers were written
    against the plain dicts they once were; new code reads attributes (``r.p_value``).
    Equality stays the dataclass's (field by field)."""

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
