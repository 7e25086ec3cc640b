"""What one forward step reads and computes, from a model's shape: the inputs of a roofline step time.

A step computes some rows (prefill chunks and decode rows): ``tokens`` rows, ``attention_pairs`` causal
(query, key) pairs, ``lm_rows`` rows through the LM head, and reads the KV of its requests
(``kv_tokens_read`` cached entries, each scheduled request's context once). :class:`StepCounter` turns
that into the two numbers a roofline needs: **bytes read** (bf16 weights the step touches — every dense
weight, the MoE experts its tokens reach under uniform routing, the LM head if any row samples — plus
the KV bytes) and **FLOPs** (:mod:`cpoc_kernels.cost`'s model FLOPs: linear layers, attention pairs, LM
head rows). Both are per whole tensor-parallel group (a card reads and computes ``1/tp`` of them; KV heads
are split across the group, at least one per card).

Used by the governor's :class:`~cpoc_kernels.step_model.WorkStepTimeModel` (which learns the hardware
constants online) and by the engine simulator's true step-time curve (:mod:`cpoc_kernels.sim.hardware`).
Exact integer counts except the expected MoE expert coverage (a float).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cpoc_kernels import cost
from cpoc_kernels.cost import ModelShape

BYTES_PER_PARAM = 2  # bf16

__all__ = ["BYTES_PER_PARAM", "StepCounter", "StepWork", "kv_bytes_per_token", "parameter_counts", "step_elasticity"]


@dataclass(frozen=True)
class StepWork:
    """What one forward step computes: ``tokens`` rows, ``attention_pairs`` causal (query, key) pairs,
    ``lm_rows`` rows through the LM head, ``kv_tokens_read`` KV entries read (each scheduled request's
    context once)."""

    tokens: int
    attention_pairs: int = 0
    lm_rows: int = 0
    kv_tokens_read: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "attention_pairs", "lm_rows", "kv_tokens_read"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"StepWork.{name} must be a finite number >= 0, got {value!r}")

    def plus(self, other: "StepWork") -> "StepWork":
        """The work of both (rows of ``other`` joining this step)."""
        return StepWork(self.tokens + other.tokens, self.attention_pairs + other.attention_pairs,
                        self.lm_rows + other.lm_rows, self.kv_tokens_read + other.kv_tokens_read)

    def scaled(self, factor: float) -> "StepWork":
        """Every part of the work times ``factor`` (more of the same requests)."""
        return StepWork(self.tokens * factor, self.attention_pairs * factor, self.lm_rows * factor,
                        self.kv_tokens_read * factor)


ELASTICITY_STEP = 0.05
MAX_ELASTICITY = 0.9


def step_elasticity(seconds_of: Callable[[StepWork], float], work: StepWork) -> float:
    """d log t / d log w of a step's time in its own work (every part scaled together; a finite difference
    of +5 %), clipped to [0, 0.9]: how much a step grows when more of the same requests share it. ``seconds_of``
    is a step-time function (a model's prediction or a true curve)."""
    alone = seconds_of(work)
    if alone <= 0:
        return 0.0
    grown = seconds_of(work.scaled(1 + ELASTICITY_STEP))
    return min(max((grown / alone - 1) / ELASTICITY_STEP, 0.0), MAX_ELASTICITY)


def parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters by kind: ``attention`` (all layers), ``dense_mlp``, ``router``, ``expert`` (one expert of
    one layer), ``shared_expert`` (all layers), ``lm_head``."""
    attention = shape.n_layers * shape.hidden * shape.head_dim * (2 * shape.n_heads + 2 * shape.n_kv_heads)
    return {
        "attention": attention,
        "dense_mlp": shape.dense_layer_count * 3 * shape.hidden * shape.intermediate,
        "router": shape.moe_layer_count * shape.hidden * shape.n_experts,
        "expert": 3 * shape.hidden * shape.moe_intermediate,
        "shared_expert": shape.moe_layer_count * 3 * shape.hidden * shape.shared_expert_intermediate,
        "lm_head": shape.vocab * shape.hidden,
    }


def kv_bytes_per_token(shape: ModelShape, tensor_parallel: int = 1) -> int:
    """KV-cache bytes one token takes on one card (KV heads split across the group, at least one each)."""
    heads = max(1, math.ceil(shape.n_kv_heads / tensor_parallel))
    return 2 * shape.n_layers * heads * shape.head_dim * BYTES_PER_PARAM


@dataclass(frozen=True)
class StepCounter:
    """Bytes and FLOPs of a :class:`StepWork` for one model on a ``tensor_parallel`` group (whole group)."""

    shape: ModelShape
    tensor_parallel: int = 1
    _params: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.shape, ModelShape):
            raise ValueError(f"shape must be a ModelShape, got {type(self.shape).__name__}")
        if isinstance(self.tensor_parallel, bool) or not isinstance(self.tensor_parallel, int) \
                or self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be an integer >= 1, got {self.tensor_parallel!r}")
        object.__setattr__(self, "_params", parameter_counts(self.shape))

    @property
    def weight_bytes(self) -> float:
        """All weights (bytes, whole group); the embedding and LM head counted as two matrices."""
        p = self._params
        experts = self.shape.moe_layer_count * self.shape.n_experts * p["expert"]
        return BYTES_PER_PARAM * (p["attention"] + p["dense_mlp"] + p["router"] + p["shared_expert"] + experts
                                  + 2 * p["lm_head"])

    def weight_bytes_read(self, tokens: float, lm_rows: float) -> float:
        """Weight bytes a step of ``tokens`` rows reads: every dense weight, the experts its tokens touch
        (uniform routing: E·(1 − (1 − k/E)^tokens) per MoE layer), the LM head if any row uses it."""
        p, s = self._params, self.shape
        dense = p["attention"] + p["dense_mlp"] + p["router"] + p["shared_expert"]
        if s.n_experts and tokens:
            touched = s.n_experts * (1.0 - (1.0 - s.experts_per_token / s.n_experts) ** tokens)
            dense += s.moe_layer_count * touched * p["expert"]
        if lm_rows:
            dense += p["lm_head"]
        return BYTES_PER_PARAM * dense

    def kv_bytes_read(self, kv_tokens_read: float) -> float:
        """KV bytes of ``kv_tokens_read`` cached entries, whole group."""
        return kv_tokens_read * kv_bytes_per_token(self.shape, self.tensor_parallel) * self.tensor_parallel

    def bytes_read(self, work: StepWork) -> float:
        """Weights touched + KV read (bytes, whole group); 0 for an empty step."""
        if work.tokens <= 0:
            return 0.0
        return self.weight_bytes_read(work.tokens, work.lm_rows) + self.kv_bytes_read(work.kv_tokens_read)

    def flops(self, work: StepWork) -> float:
        """Model FLOPs of the step (linear layers, attention pairs, LM head rows), whole group."""
        s = self.shape
        return float(work.tokens * cost.linear_flops_per_token(s)
                     + s.n_layers * 4 * s.n_heads * s.head_dim * work.attention_pairs
                     + work.lm_rows * cost.lm_head_flops_per_token(s))
