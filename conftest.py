"""Root conftest: nbval compares notebook outputs after rounding floats (to 2 decimals), so that
0.4999 and 0.5001 compare equal while a change of 0.01 or more shows. nbval's own sanitizer only
substitutes regexes (tests/nbval_sanitize.cfg: addresses, paths, timings); this rounds before it."""

from tests.nbval_rounding import round_floats


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
