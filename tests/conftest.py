"""Test configuration. TRITON_INTERPRET must be set before any kernel module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

TESTS_DIR = pathlib.Path(__file__).parent
GOLDEN_DIR = TESTS_DIR / "golden"
sys.path.insert(0, str(TESTS_DIR))  # shared test helpers: `import bits`


@pytest.fixture(scope="session")
def primitives():
    """The network reference's golden vectors (tests/golden/pocv2_primitives.json)."""
    return json.loads((GOLDEN_DIR / "pocv2_primitives.json").read_text())


@pytest.fixture
def cli(capsys):
    """Run ``cpoc ARGV`` in this process: returns (exit code, stdout, stderr)."""
    from cpoc_kernels.cli import main

    def run(argv):
        code = main(argv)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
