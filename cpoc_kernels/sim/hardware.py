"""Step-time curves of GPU-shaped engines, from the package's FLOP model and public card specs.

A forward step of an engine computes some rows (prefill chunks and decode rows) and reads the weights it
touches plus the KV cache of its requests. Its time here is

    overhead + smooth_max(bytes_read / (bandwidth·bw_efficiency), flops / (peak·mfu)) + communication

(``smooth_max(a, b) = (a^p + b^p)^(1/p)``, p = ``knee_sharpness``: a gradual knee, as measured steps have),
per card of a tensor-parallel group: FLOPs and bytes are divided by the group size, and each layer pays
two all-reduces of the step's activations. FLOPs are :mod:`cpoc_kernels.cost`'s model FLOPs (linear
layers, causal attention pairs, LM head on sampled rows). Bytes: bf16 weights (MoE: the experts the
step's tokens touch, expected under uniform routing) and the KV of every scheduled request once.

Card figures are public datasheet numbers (dense BF16 tensor FLOP/s without sparsity, HBM bandwidth,
memory, NVLink per direction); the efficiencies and overheads are assumptions stated in each preset.
This is a model of the *shape* (flat, knee, slope), not a prediction of any engine's absolute speed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cpoc_kernels import cost
from cpoc_kernels.cost import ModelShape
from cpoc_kernels.step_work import BYTES_PER_PARAM, StepCounter, StepWork, kv_bytes_per_token

__all__ = ["CARDS", "PRESETS", "QWEN3_8B", "Card", "EnginePreset", "StepCurve", "StepWork"]


@dataclass(frozen=True)
class Card:
    """Public datasheet figures of one accelerator."""

    name: str
    bf16_flops: float  # dense tensor FLOP/s
    hbm_bytes_per_second: float
    memory_bytes: float
    link_bytes_per_second: float  # NVLink, one direction


CARDS = {
    "H100": Card("H100 SXM5", 989e12, 3.35e12, 80e9, 450e9),
    "H200": Card("H200 SXM", 989e12, 4.8e12, 141e9, 450e9),
    "B200": Card("B200 (HGX)", 2250e12, 8.0e12, 180e9, 900e9),
}

QWEN3_8B = ModelShape(hidden=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, intermediate=12288,
                      vocab=151936, name="Qwen3-8B")
"""Qwen/Qwen3-8B config.json (dense, untied embeddings)."""


@dataclass(frozen=True)
class StepCurve:
    """True step time (s) of an engine for a :class:`StepWork` (see the module docstring)."""

    shape: ModelShape
    card: Card
    tensor_parallel: int = 1
    mfu: float = 0.6
    bw_efficiency: float = 0.8
    overhead_seconds: float = 4e-4
    knee_sharpness: float = 3.0
    allreduce_latency_seconds: float = 8e-6
    kv_reads: bool = True  # False: the memory side is the weights only (a curve of the step's rows alone)
    counter: StepCounter = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "counter", StepCounter(self.shape, self.tensor_parallel))

    @property
    def weight_bytes(self) -> float:
        """All weights, bytes, whole group."""
        return self.counter.weight_bytes

    def seconds(self, work: StepWork) -> float:
        if work.tokens <= 0:
            return 0.0
        tp, card = self.tensor_parallel, self.card
        read = self.counter.weight_bytes_read(work.tokens, work.lm_rows)
        if self.kv_reads:
            read += self.counter.kv_bytes_read(work.kv_tokens_read)
        memory = read / tp / (card.hbm_bytes_per_second * self.bw_efficiency)
        compute = self.counter.flops(work) / tp / (card.bf16_flops * self.mfu)
        p = self.knee_sharpness
        body = (memory ** p + compute ** p) ** (1.0 / p)
        comm = 0.0
        if tp > 1:  # two all-reduces per layer (ring: 2·(tp−1)/tp of the activations over the link)
            volume = work.tokens * self.shape.hidden * BYTES_PER_PARAM * 2 * (tp - 1) / tp
            comm = 2 * self.shape.n_layers * (self.allreduce_latency_seconds + volume / card.link_bytes_per_second)
        return self.overhead_seconds + body + comm

    def kv_capacity_tokens(self, memory_utilization: float = 0.9, activation_reserve_bytes: float = 4e9) -> int:
        """KV token slots left on each card after the weights (the group holds the same slots)."""
        free = (self.card.memory_bytes * memory_utilization - self.weight_bytes / self.tensor_parallel
                - activation_reserve_bytes)
        return max(0, int(free // kv_bytes_per_token(self.shape, self.tensor_parallel)))


@dataclass(frozen=True)
class EnginePreset:
    """A model on a card group with engine limits and a chat workload shape."""

    name: str
    curve: StepCurve
    max_batch_tokens: int = 8192
    max_num_seqs: int = 256
    prompt_median: int = 768
    prompt_sigma: float = 1.0
    prompt_range: tuple[int, int] = (16, 16384)
    output_median: int = 192
    output_sigma: float = 0.9
    output_range: tuple[int, int] = (8, 2048)
    kv_capacity_tokens: int | None = None  # None: what the cards' memory leaves

    @property
    def kv_tokens(self) -> int:
        return self.kv_capacity_tokens if self.kv_capacity_tokens is not None else self.curve.kv_capacity_tokens()


PRESETS = {
    "qwen3-0.6b": EnginePreset("Qwen3-0.6B on 1x H100", StepCurve(cost.QWEN3_0_6B, CARDS["H100"])),
    "dense-8b": EnginePreset("Qwen3-8B on 1x H100", StepCurve(QWEN3_8B, CARDS["H100"])),
    "qwen3-235b-a22b": EnginePreset("Qwen3-235B-A22B on 8x H200 (TP8)",
                                    StepCurve(cost.QWEN3_235B_A22B, CARDS["H200"], tensor_parallel=8,
                                              overhead_seconds=8e-4)),
}
"""Overheads: 0.4 ms a step on one card (scheduler + launch with CUDA graphs), 0.8 ms for TP8; MFU 0.6,
HBM efficiency 0.8 (assumptions)."""
