"""The workshop layer: exercises inside the notebooks, their checks, and the participant version.

**One source.** The notebooks in ``notebooks/`` are the instructor version: every exercise is solved,
and nbval checks them with their outputs. The participant version is generated from them
(``make workshop`` -> ``workshop/participant/``, or ``python -m circuitlib.workshop notebooks workshop``):

- in a code cell, the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` are replaced by
  ``raise NotImplementedError(...)`` at the same indentation (the function stub stays);
- a markdown cell tagged ``answer`` (a model answer to an open question) is replaced by a prompt to
  write one's own;
- all outputs are cleared.

**Checks.** An exercise's check cell calls a ``check_*`` function from ``circuitlib.workshop.nbNN``
with the participant's function. A check compares it with circuitlib on the embedded model and prints
one line: ``✓`` with what was verified, ``✗`` with what is wrong and a hint, or ``… not done yet`` when
the stub still raises NotImplementedError. Checks never raise, so a participant notebook runs top to
bottom whatever is filled in; cells after an exercise use the library, not the participant's code.
"""

from __future__ import annotations

import copy
import math
import re

from pathlib import Path
from typing import Any, Callable

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
ANSWER_TAG = "answer"
NOT_DONE = "not done yet"


# ---------------------------------------------------------------------------------------------
# Checks


class CheckResult:
    """What a check found: ``status`` is ``"correct"``, ``"wrong"`` or ``"not done"``."""

    def __init__(self, name: str, status: str, message: str):
        self.name, self.status, self.message = name, status, message

    def __bool__(self) -> bool:
        return self.status == "correct"

    def _ipython_display_(self) -> None:
        """Nothing: :func:`run_check` already printed the result (a check cell ending in the call would
        otherwise show it twice, and nbval would see an extra output)."""

    def __repr__(self) -> str:
        mark = {"correct": "✓", "wrong": "✗", "not done": "…"}[self.status]
        return f"{mark} {self.name}: {self.message}"


def run_check(name: str, attempt: Callable[[], Any], verify: Callable[[Any], str | None], *, success: str,
              hint: str = "") -> CheckResult:
    """Run ``attempt()`` (the participant's code) and ``verify`` its result.

    ``verify(result)`` returns ``None`` when the result is right, else a sentence saying what is
    wrong. NotImplementedError means the stub is not filled in yet; any other exception is reported
    with its message. The result is printed and returned; nothing is raised.
    """
    try:
        result = attempt()
    except NotImplementedError:
        out = CheckResult(name, "not done", f"{NOT_DONE}: fill in the function above, run its cell, then this one.")
    except Exception as exc:  # the participant's code failed: say how, do not crash the notebook
        out = CheckResult(name, "wrong", f"your code raised {type(exc).__name__}: {exc}" + (f" Hint: {hint}" if hint else ""))
    else:
        try:
            problem = verify(result)
        except Exception as exc:
            problem = f"the result could not be checked ({type(exc).__name__}: {exc})"
        if problem is None:
            out = CheckResult(name, "correct", success)
        else:
            out = CheckResult(name, "wrong", problem + (f" Hint: {hint}" if hint else ""))
    print(repr(out))
    return out


def close(got: Any, want: float, tol: float) -> bool:
    """Whether ``got`` is a number within ``tol`` of ``want``."""
    try:
        return math.isfinite(float(got)) and abs(float(got) - want) <= tol
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Building the participant version


def strip_solution(source: str) -> str:
    """Replace every ``# BEGIN SOLUTION`` .. ``# END SOLUTION`` block by ``raise NotImplementedError``."""
    lines, out, inside, indent = source.split("\n"), [], False, ""
    for line in lines:
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError("a '# BEGIN SOLUTION' block is opened twice without '# END SOLUTION'")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("your code here")')
            continue
        if stripped == END:
            if not inside:
                raise ValueError("'# END SOLUTION' without a '# BEGIN SOLUTION' before it")
            inside = False
            continue
        if not inside:
            out.append(line)
    if inside:
        raise ValueError("a '# BEGIN SOLUTION' block is never closed with '# END SOLUTION'")
    return "\n".join(out)


def participant_notebook(nb):
    """The participant version of an instructor notebook (an ``nbformat`` node; a new copy)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code":
            cell.source = strip_solution(cell.source)
            cell.outputs, cell.execution_count = [], None
        elif cell.cell_type == "markdown" and ANSWER_TAG in tags:
            label = re.match(r"^(#+ [^\n]*|\*\*[^*\n]+\*\*)", cell.source)
            heading = label.group(1) if label else "**Your answer**"
            cell.source = f"{heading}\n\n*Write your answer here, then compare with your neighbour or the instructor.*"
    return nb


def has_exercises(nb) -> bool:
    return any(c.cell_type == "code" and BEGIN in c.source for c in nb.cells)


def build(src: str | Path, out: str | Path) -> list[Path]:
    """Write ``out/instructor/*.ipynb`` (copies) and ``out/participant/*.ipynb`` (solutions stripped,
    outputs cleared) for every notebook in ``src``. Returns the participant notebooks' paths."""
    import nbformat

    src, out = Path(src), Path(out)
    notebooks = sorted(src.glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"no notebooks in {src}: pass the folder that holds the numbered notebooks")
    written = []
    for sub in ("instructor", "participant"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbformat.write(nb, out / "instructor" / path.name)
        nbformat.write(participant_notebook(nb), out / "participant" / path.name)
        written.append(out / "participant" / path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m circuitlib.workshop",
                                     description="Write the instructor and participant versions of the notebooks.")
    parser.add_argument("src", nargs="?", default="notebooks", help="folder with the source notebooks")
    parser.add_argument("out", nargs="?", default="workshop", help="output folder (instructor/ and participant/)")
    args = parser.parse_args(argv)
    try:
        paths = build(args.src, args.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {len(paths)} participant notebooks to {Path(args.out) / 'participant'} "
          f"and the instructor copies to {Path(args.out) / 'instructor'}")
    return 0



