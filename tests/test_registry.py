"""Adding a task is one builder plus one registry entry: the report handles any number of tasks."""

import json

import pytest

from circuitlib import report
from circuitlib.tasks import TASK_SPECS, TaskSpec, copying_batch, register_task, report_tasks, task_batch


def short_copying(tokenizer, n=64, *, seed=0, model_name="", **_):
    """A tiny extra task: name lists of exactly two names said twice."""
    return copying_batch(tokenizer, n, seed=seed, lengths=(2, 2), model_name=model_name)


@pytest.fixture
def extra_task():
    spec = register_task(TaskSpec("short_copy", "Short copying", short_copying, relation="name_copying"))
    try:
        yield spec
    finally:
        TASK_SPECS.pop(spec.name)


def test_registered_task_is_built_and_listed(toy, extra_task):
    assert "short_copy" in report_tasks()
    b = task_batch("short_copy", toy.tokenizer, 4)
    assert len(b) == 4 and all(p.count(" ") == 4 for p in b.prompts)  # "A B , A" + leading space
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("short_copy", "x", short_copying))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_batch("nope", toy.tokenizer)


def test_report_runs_with_a_third_task(toy, extra_task, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "N_PROMPTS", 16)
    monkeypatch.setattr(report, "DISCOVERY_PROMPTS", 16)
    s = report.run_report("toy", tmp_path, model=toy, progress=False, n_random=20)
    assert set(s["baseline"]["tasks"]) == {"ioi", "capitals", "short_copy"}
    assert set(s["discovery"]) == {"ioi", "capitals", "short_copy"}
    assert set(s["overlap"]["pairs"]) == {"ioi|capitals", "ioi|short_copy", "capitals|short_copy"}
    assert len(s["overlap"]["reuse"]) == 3 and all(len(v) == 3 for v in s["overlap"]["reuse"].values())
    md = (tmp_path / "report.md").read_text()
    assert "Short copying" in md
    json.loads((tmp_path / "summary.json").read_text())
