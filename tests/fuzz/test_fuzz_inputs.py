"""Fuzzing the public ops (issue 12): ``poc_inputs``, ``masked_reflect_`` / ``masked_reflect_rows_mask_``, ``poc_readout``.

Each fuzz run draws arguments (valid ones and junk), predicts independently whether they are valid, and checks:
bad arguments raise ValueError (never another exception) and leave every tensor unchanged; good ones give the
reference's values and touch only what they should. The ops reach native code (C++ RNG, Triton interpreter),
so each run happens in a subprocess: a crash fails the test instead of killing pytest. Bounded for CI:
``CPOC_FUZZ_EXAMPLES`` examples per run (default 40), derandomized.
"""
from __future__ import annotations

import math
import numbers
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("CPOC_FUZZ_EXAMPLES", "40"))
INT32 = (-(2**31), 2**31 - 1)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                 st.integers(-(2**40), 2**40), st.lists(st.integers(-3, 3), max_size=2), st.binary(max_size=2))
small_junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                       st.sampled_from([2**31, 2**40, -(2**40)]), st.lists(st.integers(-3, 3), max_size=2))
small_int_or_junk = st.one_of(st.integers(-2, 5), small_junk)
FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _good_nonces(nonces) -> bool:
    return isinstance(nonces, list) and all(_is_int(n) and INT32[0] <= n <= INT32[1] for n in nonces)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _outcome(fn):
    """('ok', value) or ('value_error', exc); any other exception propagates (a finding)."""
    try:
        return "ok", fn()
    except ValueError as exc:
        return "value_error", exc


# ----------------------------------------------------------------------------------------------- poc_inputs
@FUZZ
@given(
    nonces=st.one_of(st.lists(st.one_of(st.integers(*INT32), st.integers(2**31, 2**33), junk), max_size=3), junk),
    seq_len=small_int_or_junk, hidden=st.one_of(st.integers(-1, 9), small_junk),
    dtype=st.sampled_from(FLOAT + (torch.int32, "float32", None)),
    stronger=st.one_of(st.booleans(), junk), use_out=st.booleans(), extra_rows=st.integers(-2, 3),
    row_offset=st.one_of(st.integers(-1, 3), small_junk), backend=st.sampled_from(["auto", "torch", "triton", "gpu"]),
)
def fuzz_poc_inputs(nonces, seq_len, hidden, dtype, stronger, use_out, extra_rows, row_offset, backend):
    from cpoc_kernels import ops
    from cpoc_kernels import reference as R

    out = None
    h_ok = _is_int(hidden) and 0 < hidden < 2**31
    s_ok = _is_int(seq_len) and 0 < seq_len < 2**31 and (not h_ok or seq_len * hidden < 2**31)
    o_ok = _is_int(row_offset) and row_offset >= 0
    n = len(nonces) if isinstance(nonces, list) else 0
    if use_out and h_ok and dtype in FLOAT:
        rows = max(0, (row_offset if o_ok else 0) + n * (seq_len if s_ok else 1) + extra_rows)
        out = torch.full((rows, hidden), 3.0, dtype=dtype)
    before = None if out is None else out.clone()
    valid = (_good_nonces(nonces) and s_ok and h_ok and dtype in FLOAT and isinstance(stronger, bool) and o_ok
             and backend != "gpu" and (out is not None or row_offset == 0)
             and (out is None or out.shape[0] >= row_offset + n * seq_len))
    kind, got = _outcome(lambda: ops.poc_inputs("bh", "pk", nonces, seq_len, hidden, dtype, stronger_rng=stronger,
                                                out=out, row_offset=row_offset, backend=backend))
    assert (kind == "ok") == valid, (kind, got)
    if kind != "ok":
        assert out is None or torch.equal(out, before)
        return
    want = R.poc_inputs("bh", "pk", nonces, seq_len, hidden, dtype, stronger_rng=stronger)
    block = got.view(-1, seq_len, hidden) if out is None else got[row_offset:row_offset + n * seq_len].view(n, seq_len, hidden)
    if dtype == torch.float32:
        assert torch.allclose(block, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(block, want)
    if out is not None:
        outside = torch.ones(out.shape[0], dtype=torch.bool)
        outside[row_offset:row_offset + n * seq_len] = False
        assert torch.equal(out[outside], before[outside])


# ----------------------------------------------------------------------------------------------- reflect
def _v(kind: str, h: int, gen) -> object:
    base = torch.randn(h, generator=gen)
    unit = base / torch.linalg.vector_norm(base)
    return {"unit": unit, "unit_bf16": unit.to(torch.bfloat16), "zero": torch.zeros(h), "nan": unit.clone().fill_(math.nan),
            "double": 2 * unit, "short": unit[:-1], "int": torch.ones(h, dtype=torch.int64), "list": unit.tolist(),
            "none": None}[kind]


@FUZZ
@given(
    n=st.integers(0, 4), h=st.integers(1, 9), dtype=st.sampled_from(FLOAT),
    res_kind=st.sampled_from(["none", "same", "shape", "dtype", "alias"]),
    v_kind=st.sampled_from(["unit", "unit", "unit", "unit_bf16", "zero", "nan", "double", "short", "int", "list", "none"]),
    rows_kind=st.sampled_from(["list", "int64", "int32", "uint8", "bool", "bool_mask_op", "uint8_mask_op", "float", "junk"]),
    rows_list=st.lists(st.integers(-1, 5), max_size=5), junk_rows=junk, seed=st.integers(0, 2**16),
    backend=st.sampled_from(["auto", "torch", "triton"]),
)
def fuzz_masked_reflect(n, h, dtype, res_kind, v_kind, rows_kind, rows_list, junk_rows, seed, backend):
    from cpoc_kernels import ops
    from cpoc_kernels import reference as R

    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * 2).to(dtype)
    residual = {"none": None, "same": (torch.randn(n, h, generator=gen) * 5).to(dtype),
                "shape": torch.zeros(n + 1, h, dtype=dtype),
                "dtype": torch.zeros(n, h, dtype=torch.float64), "alias": hidden}[res_kind]
    v = _v(v_kind, h, gen)
    mask = torch.zeros(n, dtype=torch.bool)
    in_range = [r for r in rows_list if 0 <= r < n]
    mask[in_range] = True
    rows = {"list": rows_list, "int64": torch.tensor(rows_list, dtype=torch.int64),
            "int32": torch.tensor(rows_list, dtype=torch.int32),
            "uint8": torch.tensor([abs(r) for r in rows_list], dtype=torch.uint8),
            "bool": mask, "bool_mask_op": mask, "uint8_mask_op": mask.to(torch.uint8),
            "float": torch.tensor(rows_list, dtype=torch.float32), "junk": junk_rows}[rows_kind]
    before = hidden.clone(), None if residual is None else residual.clone()
    tensors_ok = res_kind in ("none", "same") and v_kind in ("unit", "unit_bf16")
    if rows_kind in ("list", "int64", "int32"):
        rows_ok = all(0 <= r < n for r in rows_list) and len(set(rows_list)) == len(rows_list)
        selected = set(rows_list)
    elif rows_kind in ("bool", "bool_mask_op", "uint8_mask_op"):
        rows_ok, selected = True, set(in_range)
    elif rows_kind == "junk" and isinstance(junk_rows, list):  # junk may be a real index list
        rows_ok = all(0 <= r < n for r in junk_rows) and len(set(junk_rows)) == len(junk_rows)
        selected = set(junk_rows)
    else:
        rows_ok, selected = False, set()
    if rows_kind.endswith("_mask_op"):
        call = lambda: ops.masked_reflect_rows_mask_(hidden, residual, v, rows, backend=backend)  # noqa: E731
    else:
        call = lambda: ops.masked_reflect_(hidden, residual, v, rows, backend=backend)  # noqa: E731
    kind, got = _outcome(call)
    assert (kind == "ok") == (tensors_ok and rows_ok), (kind, got, res_kind, v_kind, rows_kind)
    if kind != "ok":
        if res_kind != "alias":
            assert torch.equal(hidden, before[0]) and (residual is None or torch.equal(residual, before[1]))
        return
    vf = v.float()
    for x, x0 in ((hidden, before[0]), (residual, before[1])):
        if x is None:
            continue
        for r in range(n):
            if r in selected:
                ref = R.reflect(x0[r:r + 1], vf)[0]
                # the fused kernel may sum the dot in another order: 1 activation ulp at most
                assert torch.allclose(x[r].float(), ref.float(), rtol=2 ** -6, atol=1e-2 * float(x0[r].float().abs().max() + 1))
            else:
                assert torch.equal(x[r], x0[r])


# ----------------------------------------------------------------------------------------------- readout
SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero_row": 0.0, "huge_row": 3e38, "tiny_row": 1e-30}


@FUZZ
@given(
    b=st.integers(0, 4), h=st.integers(1, 40), dtype=st.sampled_from(FLOAT), k=st.one_of(st.integers(-1, 14), junk),
    specials=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(sorted(SPECIAL)), st.integers(0, 39)), max_size=3),
    nonces_junk=st.one_of(st.none(), junk), seed=st.integers(0, 2**16), backend=st.sampled_from(["auto", "torch", "triton"]),
)
def fuzz_poc_readout(b, h, dtype, k, specials, nonces_junk, seed, backend):
    from cpoc_kernels import ops
    from cpoc_kernels import reference as R

    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, h, generator=gen)
    for row, what, col in specials:
        if row < b:
            if what.endswith("_row"):
                hs[row] = SPECIAL[what]
            else:
                hs[row, col % h] = SPECIAL[what]
    hs = hs.to(dtype)
    nonces = list(range(100, 100 + b)) if nonces_junk is None else nonces_junk
    valid = _good_nonces(nonces) and len(nonces) == b and _is_int(k) and 0 < k <= h
    before = hs.clone()
    with np.errstate(all="ignore"):
        kind, got = _outcome(lambda: ops.poc_readout(hs, "bh", "pk", nonces, k=k, backend=backend))
    assert torch.equal(_bits(hs), _bits(before))  # the input is never written
    assert (kind == "ok") == valid, (kind, got)
    if kind != "ok":
        return
    ref = R.output_stage(hs, "bh", "pk", nonces, k)
    assert got.emittable.tolist() == R.is_emittable(ref, hs).tolist() or backend == "triton"
    finite_state = torch.isfinite(hs.float()).all(dim=-1)
    for i in range(b):
        payload = got.payloads[i]
        if got.emittable[i]:
            assert bool(finite_state[i]) and payload is not None
            v = R.decode_payload(payload, k)
            assert abs(float(np.linalg.norm(v.astype(np.float64))) - 1.0) <= R.UNIT_TOL
        else:
            assert payload is None and i in got.nan_rows


# ----------------------------------------------------------------------------------------------- runners
def _run_in_subprocess(name: str) -> None:
    code = (
        "import runpy, sys\n"
        f"mod = runpy.run_path({str(pathlib.Path(__file__).resolve())!r})\n"
        f"mod[{name!r}]()\n"
        "print('FUZZ-OK')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "FUZZ-OK" in res.stdout, (
        f"{name}: exit {res.returncode} (negative = killed by a signal)\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")


@pytest.mark.parametrize("name", ["fuzz_poc_inputs", "fuzz_masked_reflect", "fuzz_poc_readout"])
def test_fuzz_ops_in_a_subprocess(name):
    _run_in_subprocess(name)
