"""GPU benchmark of the fused PoC kernels vs the reference torch path (issue 5). Not a test.

    python bench/gpu_kernels.py [--small] [--no-check]

Medians of ``triton.testing.do_bench``. Bandwidth is reported as bytes moved / time against a measured
device-to-device copy (bytes read + written / time) on the same card. Shapes (fleet): poc_inputs
B=32, S=1024, H=4096 (bf16); masked_reflect_ on hidden + residual of 32768 x 4096 bf16 rows (all rows
selected, and every 2nd row); poc_readout B=32, H=4096. Also prints exactness checks against torch on
the same card (OPEN_GPU_CHECKS items 2 and 3) unless --no-check. Paste the markdown table into
bench/RESULTS.md with the card name, driver, torch/triton versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="quarter-size shapes (quick smoke run)")
    ap.add_argument("--no-check", action="store_true", help="skip the exactness checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")

    import triton
    from triton.testing import do_bench

    from cpoc_kernels import ops
    from cpoc_kernels import reference as R
    from cpoc_kernels.ops.inputs import input_seeds, normals_into_triton
    from cpoc_kernels.ops.readout import haar_normals_triton, haar_seed_table, pick_table, readout_triton
    from cpoc_kernels.ops.reflect import masked_reflect_triton

    dev = torch.device("cuda")
    bench = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731  (ms)
    B, S, H = (8, 1024, 4096) if args.small else (32, 1024, 4096)
    NROWS = 8192 if args.small else 32768
    BH, PK = "BENCH_BLOCK", "bench_pub_key"
    nonces = list(range(B))
    rows_md = []

    def row(name, ms, nbytes, ref_ms, copy_gbs):
        gbs = nbytes / ms / 1e6
        rows_md.append((name, ms, gbs, 100.0 * gbs / copy_gbs if nbytes else float("nan"), ref_ms,
                        ref_ms / ms if ref_ms else float("nan")))

    # ---------------------------------------------------------------------------------- copy bandwidth
    src = torch.empty(1 << 29, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    src = dst = None  # free (the timed lambdas close over these names)

    # ---------------------------------------------------------------------------------- poc_inputs
    for stronger in (False, True):
        seeds = input_seeds(BH, PK, nonces, stronger).to(dev)
        out = torch.empty(B * S, H, dtype=torch.bfloat16, device=dev)
        ms = bench(lambda: normals_into_triton(out, seeds, S, 0))
        ms_wrapper = bench(lambda: ops.poc_inputs(BH, PK, nonces, S, H, torch.bfloat16, stronger_rng=stronger, out=out))
        ref_ms = bench(lambda: R.poc_inputs(BH, PK, nonces, S, H, torch.bfloat16, stronger_rng=stronger, device=dev))
        tag = "stronger" if stronger else "legacy"
        row(f"poc_inputs {tag} B={B} S={S} H={H} bf16 (kernel)", ms, out.numel() * 2, ref_ms, copy_gbs)
        row(f"poc_inputs {tag} (Python wrapper incl. host SHA-256)", ms_wrapper, out.numel() * 2, ref_ms, copy_gbs)
        if not args.no_check:
            f32 = torch.empty(B * S, H, dtype=torch.float32, device=dev)
            normals_into_triton(f32, seeds, S, 0)
            ref32 = R.poc_inputs(BH, PK, nonces, S, H, torch.float32, stronger_rng=stronger, device=dev).view(B * S, H)
            nd32 = (f32.view(torch.int32) != ref32.view(torch.int32)).sum().item()
            refb = ref32.to(torch.bfloat16)
            normals_into_triton(out, seeds, S, 0)
            ndb = (out.view(torch.int16) != refb.view(torch.int16)).sum().item()
            print(f"[check] poc_inputs {tag}: fp32 elements != torch CUDA: {nd32} / {f32.numel()}; "
                  f"bf16 != torch CUDA: {ndb}")
            del f32, ref32, refb
        out = None

    # ---------------------------------------------------------------------------------- masked_reflect_
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(NROWS, H, device=dev, generator=gen).to(torch.bfloat16)
    residual = (torch.randn(NROWS, H, device=dev, generator=gen) * 8).to(torch.bfloat16)
    v = R.layer_vector(BH, 0, H, device=dev)
    for label, rows in (("all rows", torch.arange(NROWS, device=dev)),
                        ("every 2nd row", torch.arange(0, NROWS, 2, device=dev))):
        nsel = rows.numel()
        ms = bench(lambda: masked_reflect_triton(hidden, residual, v, rows))

        def ref_masked():
            for x in (hidden, residual):
                x.index_copy_(0, rows, R.reflect(x.index_select(0, rows), v))

        ref_ms = bench(ref_masked)
        row(f"masked_reflect_ {label} {NROWS}x{H} bf16 h+r", ms, 2 * 2 * nsel * H * 2, ref_ms, copy_gbs)
    ref_full_ms = bench(lambda: (R.reflect(hidden, v), R.reflect(residual, v)))
    ms = bench(lambda: masked_reflect_triton(hidden, residual, v, torch.arange(NROWS, device=dev)))
    row("masked_reflect_ all rows vs fleet unmasked reflect (h+r)", ms, 2 * 2 * NROWS * H * 2, ref_full_ms, copy_gbs)
    if not args.no_check:
        for h_ in (1024, 4096, 7168):
            x = torch.randn(4096, h_, device=dev, generator=gen).to(torch.bfloat16)
            vv = R.layer_vector(BH, 1, h_, device=dev)
            want = R.reflect(x, vv)
            masked_reflect_triton(x, None, vv, torch.arange(4096, device=dev))
            neq = (x != want).any(dim=-1).sum().item()
            print(f"[check] masked_reflect_ H={h_}: rows != torch CUDA reference: {neq} / 4096")
    hidden = residual = None

    # ---------------------------------------------------------------------------------- poc_readout
    hs = torch.randn(B, H, device=dev, generator=gen)
    idx = pick_table(BH, PK, nonces, H).to(dev)
    haar = haar_normals_triton(haar_seed_table(BH, PK, nonces), 12, dev).view(B, 11, 12)
    ms = bench(lambda: readout_triton(hs, idx, haar))
    ms_wrapper = bench(lambda: ops.poc_readout(hs, BH, PK, nonces))
    ref_ms = bench(lambda: R.output_stage(hs, BH, PK, nonces))
    row(f"poc_readout B={B} H={H} (kernel)", ms, hs.numel() * 4, ref_ms, copy_gbs)
    row("poc_readout (wrapper incl. host picks/seeds)", ms_wrapper, hs.numel() * 4, ref_ms, copy_gbs)
    if not args.no_check:
        got = ops.poc_readout(hs, BH, PK, nonces).vectors
        want = R.output_stage(hs, BH, PK, nonces)
        print(f"[check] poc_readout: rows != torch CUDA reference: {(got != want).any(-1).sum().item()} / {B}")

    # ---------------------------------------------------------------------------------- table
    print()
    print(f"Card: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.date.today().isoformat()} | copy bandwidth (read+write) {copy_gbs:.0f} GB/s")
    print()
    print("| op | ms (median) | GB/s | % of copy | reference ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ms, gbs, pct, ref_ms, sp in rows_md:
        print(f"| {name} | {ms:.3f} | {gbs:.0f} | {pct:.0f} % | {ref_ms:.3f} | {sp:.1f}x |")
    print()
    print("GB/s = bytes the op must move (inputs: written; reflect: read + written, both tensors; readout: hs read)"
          " / median time. Goals: inputs >= 20x reference and >= 80 % of copy; masked reflection >= 4x reference.")


if __name__ == "__main__":
    main()
