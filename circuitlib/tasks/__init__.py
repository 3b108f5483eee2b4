"""Tasks (IOI, Colored Objects, country -> capital, name copying) as :class:`~circuitlib.types.TaskBatch` builders, registered in :data:`TASK_SPECS`; the MAPS relation sets.

Adding a task: write a module with a builder ``f(tokenizer, n, *, seed, split?, model_name) -> TaskBatch``
and add one :class:`TaskSpec` to :data:`TASK_SPECS` (see the README's CONTRIBUTING section). The report,
circuit discovery, the reuse analysis and the causal check read the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .capitals import CAPITAL_TEMPLATES, capital_batch
from .colored_objects import COLORED_TEMPLATES, colored_objects_batch
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


@dataclass(frozen=True)
class TaskSpec:
    """One task: its builder and how the rest of circuitlib uses it.

    ``relation``: the MAPS relation whose static scores the task's circuit is compared with (IOI's
    movers copy names: ``name_copying``). ``stands_in_for``: a relation whose MAPS causal-check prompts
    this task replaces on models whose tokenizer cannot spell the MAPS template (the embedded model).
    ``in_report``: whether the report discovers and compares its circuit.
    """

    name: str
    title: str
    build: Callable
    relation: str | None = None
    stands_in_for: str | None = None
    in_report: bool = True
    description: str = ""


TASK_SPECS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to :data:`TASK_SPECS` (a name may be registered once)."""
    if spec.name in TASK_SPECS:
        raise ValueError(f"a task named {spec.name!r} is already registered")
    TASK_SPECS[spec.name] = spec
    return spec


register_task(TaskSpec("ioi", "IOI", ioi_batch, relation="name_copying",
                       description="indirect object identification (Wang et al. 2022), ABC corruption"))
# Colored Objects (Merullo et al. 2024): the task whose circuit the paper compares with IOI's. No MAPS
# relation: MAPS's relation sets have no object -> colour relation, and the colour is read off the
# prompt (each prompt pairs objects with colours afresh), not looked up from a fixed table.
register_task(TaskSpec("colored_objects", "Colored Objects", colored_objects_batch, relation=None,
                       description="'On the desk I see a red pen, a blue cup and a green book. What color is the "
                                   "cup? Answer:' -> ' blue' (Merullo et al. 2024); corruption: the question asks "
                                   "about another listed object"))
register_task(TaskSpec("capitals", "Country -> capital", capital_batch, relation="country_to_capital_wikidata",
                       stands_in_for=None, description="'The capital of France is' -> ' Paris'"))
register_task(TaskSpec("copying", "Name copying", copying_batch, stands_in_for="name_copying", in_report=False,
                       description="a name list said twice, cut before its last name"))


def report_tasks() -> tuple[str, ...]:
    """The tasks whose circuits the report discovers and compares, in registry order."""
    return tuple(name for name, spec in TASK_SPECS.items() if spec.in_report)


def task_batch(task: str, tokenizer, n: int = 64, **kwargs):
    """A :class:`TaskBatch` of ``n`` prompts of a registered task (:data:`TASK_SPECS`)."""
    if task not in TASK_SPECS:
        raise ValueError(f"unknown task {task!r}: use one of {tuple(TASK_SPECS)} (or register_task a new one)")
    return TASK_SPECS[task].build(tokenizer, n, **kwargs)


TASKS = report_tasks()  # kept for callers of the old tuple; the registry is the source of truth

__all__ = [
    "ABBA_TEMPLATES", "BABA_TEMPLATES", "CAPITAL_TEMPLATES", "COLORED_TEMPLATES", "COPYING_RELATIONS", "RelationError",
    "TASKS", "TASK_SPECS", "TaskSpec", "capital_batch", "colored_objects_batch", "copy_names", "copying_batch",
    "default_k", "ioi_batch",
    "load_relation", "read_relation", "register_task", "relation_names", "relation_table", "report_tasks", "task_batch",
]
