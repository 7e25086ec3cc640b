"""Shared fixtures for the SMST tests: the network's golden vectors and backend switches."""
import pytest

from ._golden import load_golden


@pytest.fixture(scope="session")
def smst_golden():
    """tests/golden/smst_vectors.json (produced by the Go v0.2.14 code; see its `notes`)."""
    return load_golden()


@pytest.fixture(params=["sha-ni", "portable"])
def sha_backend(request):
    """Runs a test once per native SHA-256 backend (SHA-NI skipped where the CPU lacks it)."""
    from cpoc_kernels._native import native

    lib = native()
    if lib is None:
        pytest.skip("cpoc_kernels._C not built")
    if request.param == "sha-ni" and not lib.sha256_shani_available():
        pytest.skip("no SHA extensions on this CPU")
    before = lib.sha256_backend()
    assert lib.sha256_set_backend(request.param)
    yield request.param
    lib.sha256_set_backend(before)


@pytest.fixture(params=["native", "python-fallback"])
def smst_backend(request, monkeypatch):
    """The public API with the C++ core, and with ``native()`` returning None (pure-Python fallback)."""
    from cpoc_kernels._native import native
    import cpoc_kernels.merkle.smst as smst_module

    if request.param == "native" and native() is None:
        pytest.skip("cpoc_kernels._C not built")
    if request.param == "python-fallback":
        monkeypatch.setattr(smst_module, "native", lambda: None)
    return request.param
