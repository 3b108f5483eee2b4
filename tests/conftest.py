import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the toy's matrices are tiny, and on a busy 2-core machine OpenMP
    barrier stalls made 2-thread runs 2-50x slower (a toy forward pass: 0.02 s vs 1.5 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    """The embedded model (its checkpoint ships with circuitlib), one fresh copy per test module."""
    from circuitlib.models import load_model

    return load_model("toy")
