"""The native extension: present in CI builds; the package still works (and says so once) without it."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cpoc_kernels._native import native
from cpoc_kernels.reference import mmh, uniform


def test_extension_is_built():
    assert native() is not None, "cpoc_kernels._C did not build; CI must build it"


def test_native_integer_primitives_are_bit_exact():
    lib = native()
    for seed, start in [(0, 0), (2**32 - 1, 2**32 - 40), (1589641989, 123)]:
        got = lib.mmh_range(seed, start, 64).astype(np.int64)
        want = mmh(torch.arange(start, start + 64), seed)
        assert torch.equal(torch.from_numpy(got), want)
        assert torch.equal(torch.from_numpy(lib.uniform(seed, 100)), uniform(seed, 100))


def test_native_rejects_bad_arguments_without_writing():
    lib = native()
    with pytest.raises(ValueError):
        lib.uniform(-1, 3)
    with pytest.raises(TypeError):  # a float64 buffer would be silently converted (and lost): refused
        lib.normal_into(np.zeros(4), 1)
    out = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        lib.normal_into(out, 1)
    assert not out.any()


def test_package_works_without_the_extension_and_warns_once():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["cpoc_kernels._C"] = None  # make the import fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from cpoc_kernels.ops.inputs import nonce_normals_cpu
            from cpoc_kernels.reference import nonce_normals
            import torch
            a = nonce_normals_cpu("bh", "pk", [1, 2], 50)
            b = nonce_normals_cpu("bh", "pk", [3], 50, True)
        assert torch.equal(a[1], nonce_normals("bh", "pk", 2, 50))
        assert torch.equal(b[0], nonce_normals("bh", "pk", 3, 50, True))
        msgs = [str(w.message) for w in caught if "not built" in str(w.message)]
        assert len(msgs) == 1, msgs
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
