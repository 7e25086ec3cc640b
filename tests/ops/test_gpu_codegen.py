"""The CUDA code path without a GPU: compile the Triton kernels ahead of time for sm_90 (PTX + ptxas) in a
subprocess without TRITON_INTERPRET and check the exactness-relevant instructions: precise libdevice
log/cos/sin (no approx, no FTZ), IEEE sqrt/div, no contracted FMA in our own arithmetic."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, re
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from cpoc_kernels.ops._common import launch_opts
from cpoc_kernels.ops.inputs import _normals_kernel
from cpoc_kernels.ops.readout import _readout_kernel
from cpoc_kernels.ops.reflect import _masked_reflect_kernel, _masked_reflect_rows_mask_kernel
import torch

opts = dict(launch_opts(torch.device("cuda")), num_warps=4)
tgt = GPUTarget("cuda", 90, 32)
out = {}
def comp(name, fn, sig, consts):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=tgt, options=opts)
    out[name] = k.asm["ptx"]
i32 = "i32"
comp("normals", _normals_kernel,
     dict(out_ptr="*i16", seeds_ptr="*i64", n=i32, seg_len=i32, seg_pairs=i32, seq_len=i32, hidden=i32,
          row_stride=i32, row_offset=i32, n_nonces=i32, NSEG="constexpr", KIND="constexpr", MATH="constexpr",
          BLOCK="constexpr", FLAT="constexpr", CONTIG="constexpr"),
     dict(NSEG=8, KIND=2, MATH=1, BLOCK=1024, FLAT=False, CONTIG=True))
comp("reflect_f32", _masked_reflect_kernel,
     dict(h_ptr="*fp32", r_ptr="*fp32", v_ptr="*fp32", rows_ptr="*i64", H=i32, h_stride=i32, r_stride=i32,
          HAS_RES="constexpr", KIND="constexpr", BLOCK="constexpr", SINGLE="constexpr"),
     dict(HAS_RES=True, KIND=0, BLOCK=4096, SINGLE=True))
comp("reflect_mask_f32", _masked_reflect_rows_mask_kernel,
     dict(h_ptr="*fp32", r_ptr="*fp32", v_ptr="*fp32", mask_ptr="*u8", H=i32, h_stride=i32, r_stride=i32,
          m_stride=i32, HAS_RES="constexpr", KIND="constexpr", BLOCK="constexpr", SINGLE="constexpr"),
     dict(HAS_RES=True, KIND=0, BLOCK=4096, SINGLE=True))
comp("readout", _readout_kernel,
     dict(hs_ptr="*i16", idx_ptr="*i64", haar_ptr="*fp32", out_ptr="*fp16", H=i32, hs_stride=i32,
          K="constexpr", KP="constexpr", KIND="constexpr", BLOCK="constexpr", SINGLE="constexpr"),
     dict(K=12, KP=16, KIND=2, BLOCK=2048, SINGLE=False))
print("PTXJSON" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def ptx():
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_ALWAYS_COMPILE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PTXJSON"))
    return json.loads(line[len("PTXJSON"):])


def _ops(text: str) -> set[str]:
    return set(re.findall(r"\b(?:fma|mul|add|sub|div|sqrt|lg2|ex2|sin|cos|rsqrt|rcp)\.[a-z0-9.]+", text))


def test_normals_use_precise_non_ftz_libdevice(ptx):
    ops = _ops(ptx["normals"])
    assert not any("approx" in o or "ftz" in o for o in ops), sorted(ops)
    assert "sqrt.rn.f32" in ops and "mul.rn.f32" in ops
    assert "cvt.rn.f32.u32" in ptx["normals"]  # uint32 -> fp32 round-to-nearest


def test_reflect_fp32_has_no_fma(ptx):
    ops = _ops(ptx["reflect_f32"])
    assert not any(o.startswith("fma") for o in ops), sorted(ops)
    assert {"mul.rn.f32", "sub.rn.f32"} <= ops


def test_reflect_rows_mask_compiles_to_the_same_arithmetic(ptx):
    """The row-mask kernel (N programs, per-row early exit) compiles for sm_90 with the index kernel's math."""
    ops = _ops(ptx["reflect_mask_f32"])
    assert not any(o.startswith("fma") for o in ops), sorted(ops)
    assert ops == _ops(ptx["reflect_f32"])
    text = ptx["reflect_mask_f32"]
    load = text.index("ld.global.b8")  # the program's mask byte, then a branch over the whole row body
    assert re.search(r"setp\.eq\.b16\s+(%p\d+), %rs\d+, 0;(\s+\.loc[^\n]*)?\s+@\1 bra", text[load:]), text[load:load + 400]


def test_readout_ieee_div_sqrt_no_fma(ptx):
    ops = _ops(ptx["readout"])
    assert not any(o.startswith("fma") or "approx" in o or "ftz" in o for o in ops), sorted(ops)
    assert {"div.rn.f32", "sqrt.rn.f32"} <= ops
