"""Tasks (IOI, country -> capital) as :class:`~circuitlib.types.TaskBatch`, and the MAPS relation sets."""

from .capitals import CAPITAL_TEMPLATES, capital_batch
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

TASKS = ("ioi", "capitals")


def task_batch(task: str, tokenizer, n: int = 64, **kwargs):
    """A :class:`TaskBatch` for ``task`` (``"ioi"`` or ``"capitals"``)."""
    if task == "ioi":
        return ioi_batch(tokenizer, n, **kwargs)
    if task == "capitals":
        return capital_batch(tokenizer, n, **kwargs)
    raise ValueError(f"unknown task {task!r}: use one of {TASKS}")


__all__ = [
    "ABBA_TEMPLATES", "BABA_TEMPLATES", "CAPITAL_TEMPLATES", "COPYING_RELATIONS", "RelationError",
    "TASKS", "capital_batch", "default_k", "ioi_batch", "load_relation", "read_relation",
    "relation_names", "relation_table", "task_batch",
]
