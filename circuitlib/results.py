"""The base of circuitlib's experiment results: small dataclasses that turn into JSON.

Every experiment (a faithfulness measurement, a causal check, a comparison, a test table) returns a
dataclass deriving from :class:`Result`: its fields are documented where it is defined, ``to_dict()``
gives plain JSON-able Python (tensors become lists, heads ``"L.H"``), ``to_json()`` the text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

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
    """Mixin for result dataclasses: ``to_dict()`` / ``to_json()``; ``r["field"]`` reads a field."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]
