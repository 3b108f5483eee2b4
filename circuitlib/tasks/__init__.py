"""Tasks (IOI, country -> capital, name copying) as :class:`~circuitlib.types.TaskBatch`, and the MAPS relation sets."""

from .capitals import CAPITAL_TEMPLATES, capital_batch
from .copying import copy_names, copying_batch
from .ioi import ABBA_TEMPLATES, BABA_TEMPLATES, ioi_batch
from .relations import (
    COPYING_RELATIONS,
    RelationError,
    default_k,
    load_relation,
    read_relation,
    relation_names,
    relation_table,
)

TASKS = ("ioi", "capitals")  # the two tasks whose circuits the project discovers and compares
BUILDERS = {"ioi": ioi_batch, "capitals": capital_batch, "copying": copying_batch}


def task_batch(task: str, tokenizer, n: int = 64, **kwargs):
    """A :class:`TaskBatch` for ``task``: ``"ioi"``, ``"capitals"`` or ``"copying"`` (name lists said
    twice; the task of MAPS's name-copying causal check)."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}: use one of {tuple(BUILDERS)}")
    return BUILDERS[task](tokenizer, n, **kwargs)


__all__ = [
    "ABBA_TEMPLATES", "BABA_TEMPLATES", "BUILDERS", "CAPITAL_TEMPLATES", "COPYING_RELATIONS", "RelationError",
    "TASKS", "capital_batch", "copy_names", "copying_batch", "default_k", "ioi_batch", "load_relation", "read_relation",
    "relation_names", "relation_table", "task_batch",
]
