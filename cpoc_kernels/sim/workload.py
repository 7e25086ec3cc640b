"""Chat arrival traces for the engine simulator: Poisson or bursty arrivals, log-normal lengths."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "bursty")


@dataclass(frozen=True)
class ChatArrival:
    """One chat request of a trace: arrival time (s), prompt and output lengths (tokens)."""

    arrival: float
    prompt_len: int
    output_len: int


def _lengths(rng: np.random.Generator, n: int, median: int, sigma: float, bounds: tuple[int, int]) -> np.ndarray:
    values = np.exp(rng.normal(math.log(median), sigma, n))
    return np.clip(np.rint(values), bounds[0], bounds[1]).astype(int)


def chat_trace(rate: float, n_requests: int, seed: int, prompt: tuple[int, float, tuple[int, int]],
               output: tuple[int, float, tuple[int, int]], arrivals: str = "poisson",
               burst_factor: float = 4.0, burst_share: float = 0.2, burst_seconds: float = 2.0) -> list[ChatArrival]:
    """``n_requests`` chat requests arriving at mean ``rate`` per second.

    ``poisson``: exponential gaps. ``bursty``: a two-state Markov-modulated Poisson process — bursts
    (``burst_share`` of the time, mean length ``burst_seconds``) at ``burst_factor`` × the quiet rate,
    scaled so that the mean rate is ``rate``. ``prompt``/``output``: (median, log-normal sigma, (min, max)).
    """
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")
    if not rate > 0 or n_requests < 1:
        raise ValueError(f"need rate > 0 and n_requests >= 1, got {rate}, {n_requests}")
    rng = np.random.default_rng(seed)
    prompts = _lengths(rng, n_requests, *prompt)
    outputs = _lengths(rng, n_requests, *output)
    if arrivals == "poisson":
        times = np.cumsum(rng.exponential(1.0 / rate, n_requests))
    else:
        quiet = rate / (1 - burst_share + burst_share * burst_factor)
        rates = (quiet, quiet * burst_factor)
        means = (burst_seconds * (1 - burst_share) / burst_share, burst_seconds)
        times, t, state, until = [], 0.0, 0, rng.exponential(means[0])
        while len(times) < n_requests:
            gap = rng.exponential(1.0 / rates[state])
            if t + gap > until:  # the state changes first; the memoryless gap restarts there
                t, state = until, 1 - state
                until = t + rng.exponential(means[state])
                continue
            t += gap
            times.append(t)
        times = np.array(times)
    return [ChatArrival(float(a), int(p), int(o)) for a, p, o in zip(times, prompts, outputs)]
