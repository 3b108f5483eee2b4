"""Root conftest: nbval compares notebook outputs after rounding floats (to 2 decimals), so that
0.4999 and 0.5001 compare equal while a change of 0.01 or more shows. nbval's own sanitizer only
substitutes regexes (tests/nbval_sanitize.cfg: addresses, paths, timings); this rounds before it.

Every notebook cell gets the ``notebook`` marker, so that ``make test`` can run the notebooks (and the
``bad_input`` tests) in its plain run and every other test in its run-time type-checked run
(``-m "notebook or bad_input"`` / ``-m "not bad_input"``).
"""

import pytest

from tests.nbval_rounding import round_floats


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)


def pytest_configure(config):
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to patch
        return
    if getattr(IPyNbCell.sanitize, "_rounds", False):
        return
    original = IPyNbCell.sanitize

    def sanitize(self, s):
        return original(self, round_floats(s) if isinstance(s, str) else s)

    sanitize._rounds = True
    IPyNbCell.sanitize = sanitize
