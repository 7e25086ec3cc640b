"""Timing for the GPU benchmarks: ``triton.testing.do_bench`` medians on CUDA, a host-clock median on CPU
(``gpu_check.py --dry-run`` runs the same code paths there), and the device-to-device copy bandwidth."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Timer = Callable[[Callable[[], object]], float]


def make_timer(device: torch.device, warmup_ms: int = 25, rep_ms: int = 100, cpu_reps: int = 2) -> Timer:
    """``timer(fn) -> median milliseconds``. CUDA: do_bench (events, L2 flushed between runs); CPU: one warm-up
    call, then the median of ``cpu_reps`` perf_counter-timed calls (only for checking code paths)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    def cpu_timer(fn) -> float:
        fn()
        times = []
        for _ in range(max(1, cpu_reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_timer


def copy_bandwidth_gbs(device: torch.device, timer: Timer, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy: (bytes read + bytes written) / median time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    src = dst = None  # free (the timed lambda closes over these names)
    return 2 * nbytes / ms / 1e6
