"""GPU benchmark of the fused PoC kernels vs the reference torch path (issue 5). Not a test.

    python bench/gpu_kernels.py [--small] [--no-check]

Medians of ``triton.testing.do_bench``. Bandwidth is reported as bytes moved / time against a measured
device-to-device copy (bytes read + written / time) on the same card. Shapes (fleet): poc_inputs
B=32, S=1024, H=4096 (bf16); masked_reflect_ on hidden + residual of 32768 x 4096 bf16 rows (all rows
selected, and every 2nd row); poc_readout B=32, H=4096. Also runs the exactness checks of
``bench/gpu_check_exact.py`` (OPEN_GPU_CHECKS items 2 and 3, the readout) unless --no-check.
``bench/gpu_check.py`` calls :func:`run` (``size="tiny"`` on CPU for its dry run). Paste the markdown table
into bench/RESULTS.md with the card name, driver, torch/triton versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable

import torch

from gpu_timing import copy_bandwidth_gbs, make_timer

# (B, S, H, reflect rows, copy bytes) per size; "tiny" is for CPU dry runs under the Triton interpreter.
SIZES = {
    "full": (32, 1024, 4096, 32768, 1 << 30),
    "small": (8, 1024, 4096, 8192, 1 << 28),
    "tiny": (2, 4, 64, 8, 1 << 16),
}
GOALS = "Goals: inputs >= 20x reference and >= 80 % of copy; masked reflection >= 4x reference."
BYTES_NOTE = ("GB/s = bytes the op must move (inputs: written; reflect: read + written, both tensors; readout: hs "
              "read) / median time.")


def run(device: torch.device, size: str = "full", log: Callable[[str], None] = print, timer=None) -> dict:
    """Time every kernel and its reference path on ``device``; returns ``{"copy_gbs", "rows": [dict]}``."""
    from cpoc_kernels import ops
    from cpoc_kernels import reference as R
    from cpoc_kernels.ops.inputs import input_seeds, normals_into_triton
    from cpoc_kernels.ops.readout import haar_normals_triton, haar_seed_table, pick_table, readout_triton
    from cpoc_kernels.ops.reflect import masked_reflect_triton

    timer = timer or make_timer(device)
    B, S, H, NROWS, COPY = SIZES[size]
    BH, PK = "BENCH_BLOCK", "bench_pub_key"
    nonces = list(range(B))
    rows: list[dict] = []
    copy_gbs = copy_bandwidth_gbs(device, timer, COPY)
    log(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write, {COPY / 2**20:.0f} MiB)")

    def row(name, ms, nbytes, ref_ms):
        gbs = nbytes / ms / 1e6
        rows.append(dict(op=name, ms=ms, gbs=gbs, pct_copy=100.0 * gbs / copy_gbs, ref_ms=ref_ms,
                         speedup=ref_ms / ms if ref_ms else None))
        log(f"  {name}: {ms:.3f} ms, {gbs:.0f} GB/s, reference {ref_ms:.3f} ms ({ref_ms / ms:.1f}x)")

    # ---------------------------------------------------------------------------------- poc_inputs
    for stronger in (False, True):
        seeds = input_seeds(BH, PK, nonces, stronger).to(device)
        out = torch.empty(B * S, H, dtype=torch.bfloat16, device=device)
        ms = timer(lambda: normals_into_triton(out, seeds, S, 0))
        ms_wrapper = timer(lambda: ops.poc_inputs(BH, PK, nonces, S, H, torch.bfloat16, stronger_rng=stronger, out=out))
        ref_ms = timer(lambda: R.poc_inputs(BH, PK, nonces, S, H, torch.bfloat16, stronger_rng=stronger, device=device))
        tag = "stronger" if stronger else "legacy"
        row(f"poc_inputs {tag} B={B} S={S} H={H} bf16 (kernel)", ms, out.numel() * 2, ref_ms)
        row(f"poc_inputs {tag} (Python wrapper incl. host SHA-256)", ms_wrapper, out.numel() * 2, ref_ms)
        out = seeds = None  # free (the timed lambdas close over these names)

    # ---------------------------------------------------------------------------------- masked_reflect_
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(NROWS, H, generator=gen, device=device).to(torch.bfloat16)
    residual = (torch.randn(NROWS, H, generator=gen, device=device) * 8).to(torch.bfloat16)
    v = R.layer_vector(BH, 0, H, device=device)
    every_row = torch.arange(NROWS, device=device)
    for label, sel in (("all rows", every_row), ("every 2nd row", torch.arange(0, NROWS, 2, device=device))):
        ms = timer(lambda: masked_reflect_triton(hidden, residual, v, sel))

        def ref_masked():
            for x in (hidden, residual):
                x.index_copy_(0, sel, R.reflect(x.index_select(0, sel), v))

        ref_ms = timer(ref_masked)
        row(f"masked_reflect_ {label} {NROWS}x{H} bf16 h+r", ms, 2 * 2 * sel.numel() * H * 2, ref_ms)
    ref_full_ms = timer(lambda: (R.reflect(hidden, v), R.reflect(residual, v)))
    ms = timer(lambda: masked_reflect_triton(hidden, residual, v, every_row))
    row("masked_reflect_ all rows vs fleet unmasked reflect (h+r)", ms, 2 * 2 * NROWS * H * 2, ref_full_ms)
    hidden = residual = None

    # ---------------------------------------------------------------------------------- poc_readout
    hs = torch.randn(B, H, generator=gen, device=device)
    idx = pick_table(BH, PK, nonces, H).to(device)
    haar = haar_normals_triton(haar_seed_table(BH, PK, nonces), 12, device).view(B, 11, 12)
    ms = timer(lambda: readout_triton(hs, idx, haar))
    ms_wrapper = timer(lambda: ops.poc_readout(hs, BH, PK, nonces))
    ref_ms = timer(lambda: R.output_stage(hs, BH, PK, nonces))
    row(f"poc_readout B={B} H={H} (kernel)", ms, hs.numel() * 4, ref_ms)
    row("poc_readout (wrapper incl. host picks/seeds)", ms_wrapper, hs.numel() * 4, ref_ms)
    return {"copy_gbs": copy_gbs, "rows": rows, "shape": dict(B=B, S=S, H=H, reflect_rows=NROWS)}


def markdown(result: dict) -> list[str]:
    lines = ["| op | ms (median) | GB/s | % of copy | reference ms | speedup |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['ms']:.3f} | {r['gbs']:.0f} | {r['pct_copy']:.0f} % | {r['ref_ms']:.3f} | "
                     f"{r['speedup']:.1f}x |")
    lines += ["", f"Copy bandwidth (read + write): {result['copy_gbs']:.0f} GB/s. {BYTES_NOTE} {GOALS}"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="quarter-size shapes (quick smoke run)")
    ap.add_argument("--no-check", action="store_true", help="skip the exactness checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
    import triton

    dev = torch.device("cuda")
    if not args.no_check:
        import gpu_check_exact as X

        checks = X.check_inputs_vs_torch(dev, [(8, 1024, 4096, False), (8, 1024, 4096, True)])
        checks += X.check_reflect(dev, [(4096, 1024), (4096, 4096), (4096, 7168)])
        checks += X.check_readout(dev, [(256, 4096, torch.float32)])
        for c in checks:
            print(c.line())
    result = run(dev, "small" if args.small else "full")
    print()
    print(f"Card: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.date.today().isoformat()}")
    print()
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
