"""The workshop layer: solution stripping, the participant version, and checks that never crash."""

import json
from pathlib import Path

import nbformat
import pytest

from circuitlib import workshop

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_strip_solution_keeps_the_stub_and_indentation():
    src = "def f(x):\n    '''doc'''\n    # BEGIN SOLUTION\n    y = x + 1\n    return y\n    # END SOLUTION\n\nprint(1)"
    assert workshop.strip_solution(src) == (
        "def f(x):\n    '''doc'''\n    raise NotImplementedError(\"your code here\")\n\nprint(1)")
    assert workshop.strip_solution("a = 1") == "a = 1"
    for bad in ("# BEGIN SOLUTION\nx", "# END SOLUTION", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"):
        with pytest.raises(ValueError, match="SOLUTION"):
            workshop.strip_solution(bad)


def test_participant_notebook_strips_answers_and_outputs():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("**Question 1.** Why?"),
                nbformat.v4.new_markdown_cell("**Model answer.** Because.", metadata={"tags": ["answer"]}),
                nbformat.v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return 2\n    # END SOLUTION",
                                          outputs=[nbformat.v4.new_output("stream", text="x")], execution_count=3)]
    p = workshop.participant_notebook(nb)
    assert p.cells[0].source == "**Question 1.** Why?"
    assert "Because" not in p.cells[1].source and p.cells[1].source.startswith("**Model answer.**")
    assert "return 2" not in p.cells[2].source and p.cells[2].outputs == [] and p.cells[2].execution_count is None
    assert "return 2" in nb.cells[2].source  # the source notebook is not changed


def test_checks_report_not_done_wrong_and_correct(capsys):
    def stub():
        raise NotImplementedError

    r = workshop.run_check("ex", stub, lambda v: None, success="ok")
    assert r.status == "not done" and workshop.NOT_DONE in capsys.readouterr().out
    r = workshop.run_check("ex", lambda: 1 / 0, lambda v: None, success="ok", hint="divide by something")
    assert r.status == "wrong" and "ZeroDivisionError" in r.message and "divide by something" in r.message
    r = workshop.run_check("ex", lambda: 3, lambda v: None if v == 4 else f"got {v}, expected 4", success="ok")
    assert r.status == "wrong" and "got 3" in r.message
    assert workshop.run_check("ex", lambda: 4, lambda v: None if v == 4 else "no", success="four").status == "correct"


def _check_cells(nb):
    """Code cells that call a check function (``check_...(``), not those that define or import one."""
    import re

    call = re.compile(r"(?<!def )\bcheck_\w+\(")
    return [c for c in nb.cells if c.cell_type == "code" and call.search(c.source)
            and not re.search(r"^\s*(def check_|from .* import)", c.source, re.M)]


def test_instructor_notebooks_solve_every_exercise():
    """The committed notebooks (instructor version): every check cell printed a ✓."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in _check_cells(nb):
            text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
            assert "✓" in text and "✗" not in text, (path.name, cell.source[:80], text)


def test_participant_notebooks_run_top_to_bottom(tmp_path):
    """Every participant notebook executes without an error; every check says 'not done yet'."""
    from nbclient import NotebookClient

    paths = workshop.build(NOTEBOOKS, tmp_path)
    with_exercises = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if not workshop.has_exercises(nbformat.read(NOTEBOOKS / path.name, as_version=4)):
            continue
        with_exercises += 1
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, (path.name, errors[0].get("ename"), errors[0].get("evalue"))
        for cell in _check_cells(nb):
            text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
            assert workshop.NOT_DONE in text, (path.name, cell.source[:80], text)
    assert with_exercises == len(paths), "every notebook has exercises"


def test_environment_yml_installs_what_the_makefile_installs():
    """Conda route for a room of laptops: same torch pin as the Makefile, circuitlib with its dev extras,
    a Python the package accepts, and a CPU-only torch line pointing at the same index as
    `make install TORCH_INDEX=...` (commented out, so the default install is unchanged)."""
    import re

    import yaml

    root = NOTEBOOKS.parent
    text = (root / "environment.yml").read_text()
    env = yaml.safe_load(text)
    makefile = (root / "Makefile").read_text()
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M).group(1)
    cpu_index = re.search(r"TORCH_INDEX=(https://\S+)", makefile).group(1)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert f"torch=={torch_version}" in pip and "-e .[dev]" in pip
    assert pip.index(f"torch=={torch_version}") < pip.index("-e .[dev]")  # torch before its dependents
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = re.search(r'requires-python = ">=(\d+\.\d+)"', (root / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))
    assert re.search(rf"^\s*# - --extra-index-url {re.escape(cpu_index)}\s*$", text, re.M), "CPU-only line missing"
    assert not any(str(p).startswith("--") for p in pip)  # the CPU index stays opt-in
