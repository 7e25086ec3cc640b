"""Cost model: what one inference request is worth in PoC nonces (the exchange rate of protocol §5.3).

Everything here is a FLOP count (integers, exact) for a transformer of a given :class:`ModelShape`.

What is counted (one multiply-add = 2 FLOPs):

* **Linear layers**, per token and per decoder layer, ``2 * (parameters touched)``:
  attention projections q, k, v, o: ``2·hidden·head_dim·(2·n_heads + 2·n_kv_heads)`` (GQA: k and v
  project to ``n_kv_heads`` heads); a dense SwiGLU MLP (gate, up, down): ``2·3·hidden·intermediate``;
  an MoE layer: the router ``2·hidden·n_experts`` plus only the *active* experts
  ``experts_per_token·2·3·hidden·moe_intermediate`` (plus a shared expert and its scalar gate if the
  model has one).
* **Attention scores and values**, per decoder layer: a query at absolute position ``p`` attends to the
  ``p + 1`` keys ``0..p`` (causal, the query's own key included). ``QKᵀ`` and ``P·V`` cost
  ``2·head_dim`` FLOPs per (query head, key) each, so ``4·n_heads·head_dim·(p + 1)``. A prefill of ``n``
  tokens starting at position ``s`` sums this over ``p = s..s+n-1``: ``n·s + n·(n+1)/2`` (query, key) pairs.
  This is the useful causal work, not what a tiled kernel computes (masked tiles are not counted).
* **LM head** ``2·hidden·vocab`` per position whose logits are computed: a PoC nonce has none (the PoC
  forward stops at the final norm, spec algorithm §5.1); a chat request computes logits on the positions
  it samples from: the last prompt position and each decode step.

Not counted: embedding lookups, norms, RoPE, softmax, activations, residual adds, the PoC Householder
reflections (all O(hidden) per token per layer, < 0.1 % of the total for the shapes here), and
communication. So these are the *model* FLOPs; the time per FLOP differs between a compute-bound prefill
and a memory-bound decode, which is what :func:`fit_against_step_times` measures.

Request convention: ``prompt_len`` prompt tokens are prefilled (logits on the last one give output token 1),
then ``output_len - 1`` decode steps each feed the previous output token (the last output token is
never fed back). Decode step ``i`` (1-based) is one token at position ``prompt_len + i - 1`` attending to
``prompt_len + i`` keys. Hence a request costs exactly a prefill of ``prompt_len + output_len - 1``
tokens with ``output_len`` LM-head positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_SEQ_LEN = 1024
"""Tokens per PoC nonce on chain (PoC v2 prefill scheme)."""

WORKED_TABLE_LENGTHS: tuple[tuple[int, int], ...] = ((128, 128), (1024, 256), (4096, 512), (16384, 1024))
"""(prompt_len, output_len) rows of :func:`worked_table`."""


def _require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers of a decoder-only transformer that the FLOP model needs.

    ``intermediate`` is the dense MLP width (used by the dense layers); MoE layers use
    ``moe_intermediate`` per expert. ``n_moe_layers`` is how many of the ``n_layers`` layers are MoE
    (``None``: all of them when ``n_experts > 0``, none otherwise).
    """

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    n_moe_layers: int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for attr in ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab"):
            _require_int(attr, getattr(self, attr), 1)
        for attr in ("intermediate", "n_experts", "experts_per_token", "moe_intermediate",
                     "shared_expert_intermediate"):
            _require_int(attr, getattr(self, attr), 0)
        if self.n_experts > 0:
            if not 1 <= self.experts_per_token <= self.n_experts:
                raise ValueError(f"experts_per_token must be in 1..n_experts={self.n_experts}, "
                                 f"got {self.experts_per_token}")
            if self.moe_intermediate < 1:
                raise ValueError("an MoE shape needs moe_intermediate >= 1")
        elif self.experts_per_token or self.moe_intermediate:
            raise ValueError("experts_per_token / moe_intermediate given but n_experts == 0")
        if self.n_moe_layers is None:  # normalise: equal shapes compare equal however they were built
            object.__setattr__(self, "n_moe_layers", self.n_layers if self.n_experts > 0 else 0)
        else:
            _require_int("n_moe_layers", self.n_moe_layers, 0)
            if self.n_moe_layers > self.n_layers:
                raise ValueError(f"n_moe_layers={self.n_moe_layers} > n_layers={self.n_layers}")
            if self.n_moe_layers > 0 and self.n_experts == 0:
                raise ValueError("n_moe_layers > 0 but n_experts == 0")
        if self.dense_layer_count > 0 and self.intermediate < 1:
            raise ValueError("dense layers present but intermediate == 0")

    @property
    def moe_layer_count(self) -> int:
        """Decoder layers whose MLP is a mixture of experts."""
        return self.n_moe_layers

    @property
    def dense_layer_count(self) -> int:
        """Decoder layers with a dense MLP."""
        return self.n_layers - self.moe_layer_count

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any, name: str = "") -> "ModelShape":
        """Build from a Hugging Face config object or dict (Qwen3 / Qwen3-MoE / Qwen2-MoE field names).

        MoE layers follow Qwen3-MoE: layer ``i`` is MoE iff ``num_experts > 0``, ``i`` is not in
        ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``.
        """
        def get(key: str, default: Any = None) -> Any:
            if isinstance(config, Mapping):
                value = config.get(key, default)
            else:
                value = getattr(config, key, default)
            return default if value is None else value

        text_config = get("text_config")
        if text_config is not None:
            return cls.from_hf_config(text_config, name=name)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if get(k) is None]
        if missing:
            raise ValueError(f"config lacks {missing}")
        hidden = get("hidden_size")
        n_heads = get("num_attention_heads")
        n_layers = get("num_hidden_layers")
        n_experts = get("num_experts", 0) or get("num_local_experts", 0)
        sparse_step = get("decoder_sparse_step", 1)
        mlp_only = set(get("mlp_only_layers", []) or [])
        if n_experts > 0:
            if sparse_step < 1:
                raise ValueError(f"decoder_sparse_step must be >= 1, got {sparse_step}")
            n_moe = sum(1 for i in range(n_layers) if i not in mlp_only and (i + 1) % sparse_step == 0)
        else:
            n_moe = 0
        return cls(
            hidden=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", n_heads),
            head_dim=get("head_dim", hidden // n_heads),
            intermediate=get("intermediate_size", 0),
            vocab=get("vocab_size"),
            n_experts=n_experts,
            experts_per_token=get("num_experts_per_tok", 0) if n_experts else 0,
            moe_intermediate=get("moe_intermediate_size", 0) if n_experts else 0,
            shared_expert_intermediate=get("shared_expert_intermediate_size", 0) if n_experts else 0,
            n_moe_layers=n_moe,
            name=name or str(get("_name_or_path", "") or get("model_type", "")),
        )


QWEN3_0_6B = ModelShape(hidden=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                        intermediate=3072, vocab=151936, name="Qwen3-0.6B")
"""Qwen/Qwen3-0.6B config.json (dense, tied embeddings: the LM head still costs 2·hidden·vocab)."""

QWEN3_235B_A22B = ModelShape(hidden=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128,
                             intermediate=12288, vocab=151936, n_experts=128, experts_per_token=8,
                             moe_intermediate=1536, name="Qwen3-235B-A22B")
"""Qwen/Qwen3-235B-A22B config.json (all 94 layers MoE: decoder_sparse_step 1, no mlp_only_layers)."""


# ----------------------------------------------------------------------------------------------
# FLOP components


def attention_projection_flops_per_token(shape: ModelShape) -> int:
    """FLOPs of the q, k, v, o projections of one token in one layer."""
    return 2 * shape.hidden * shape.head_dim * (2 * shape.n_heads + 2 * shape.n_kv_heads)


def dense_mlp_flops_per_token(shape: ModelShape) -> int:
    """FLOPs of one token through one dense SwiGLU MLP (gate, up, down)."""
    return 2 * 3 * shape.hidden * shape.intermediate


def moe_flops_per_token(shape: ModelShape) -> int:
    """FLOPs of one token through one MoE layer: router + active experts (+ shared expert and its gate)."""
    if shape.n_experts == 0:
        return 0
    router = 2 * shape.hidden * shape.n_experts
    experts = shape.experts_per_token * 2 * 3 * shape.hidden * shape.moe_intermediate
    shared = 0
    if shape.shared_expert_intermediate:
        shared = 2 * 3 * shape.hidden * shape.shared_expert_intermediate + 2 * shape.hidden
    return router + experts + shared


def linear_flops_per_token(shape: ModelShape) -> int:
    """FLOPs of all linear layers of all decoder layers for one token (no LM head)."""
    return (shape.n_layers * attention_projection_flops_per_token(shape)
            + shape.dense_layer_count * dense_mlp_flops_per_token(shape)
            + shape.moe_layer_count * moe_flops_per_token(shape))


def lm_head_flops_per_token(shape: ModelShape) -> int:
    """FLOPs of the LM head for one position."""
    return 2 * shape.hidden * shape.vocab


def attention_key_pairs(n_tokens: int, context_start: int = 0) -> int:
    """Causal (query, key) pairs of ``n_tokens`` queries at positions ``context_start..``: Σ (p + 1)."""
    _require_int("n_tokens", n_tokens, 0)
    _require_int("context_start", context_start, 0)
    return n_tokens * context_start + n_tokens * (n_tokens + 1) // 2


def attention_flops(shape: ModelShape, n_tokens: int, context_start: int = 0) -> int:
    """Score + value FLOPs (all layers) of ``n_tokens`` queries starting at position ``context_start``."""
    return shape.n_layers * 4 * shape.n_heads * shape.head_dim * attention_key_pairs(n_tokens, context_start)


# ----------------------------------------------------------------------------------------------
# Requests and nonces


def prefill_flops(shape: ModelShape, n_tokens: int, context_start: int = 0, lm_head_tokens: int = 0) -> int:
    """FLOPs to process ``n_tokens`` consecutive tokens at positions ``context_start..`` (a prefill chunk).

    ``context_start``: tokens already in the KV cache before the chunk. ``lm_head_tokens``: how many of
    the chunk's positions run the LM head (0 for PoC; 1 for the final chunk of a chat prompt).
    """
    _require_int("n_tokens", n_tokens, 0)
    _require_int("lm_head_tokens", lm_head_tokens, 0)
    if lm_head_tokens > n_tokens:
        raise ValueError(f"lm_head_tokens={lm_head_tokens} > n_tokens={n_tokens}")
    return (n_tokens * linear_flops_per_token(shape)
            + attention_flops(shape, n_tokens, context_start)
            + lm_head_tokens * lm_head_flops_per_token(shape))


def decode_flops(shape: ModelShape, context_len: int) -> int:
    """FLOPs of one decode step: one token attending to ``context_len`` keys (itself included), LM head."""
    _require_int("context_len", context_len, 1)
    return prefill_flops(shape, 1, context_start=context_len - 1, lm_head_tokens=1)


def request_flops(shape: ModelShape, prompt_len: int, output_len: int) -> int:
    """FLOPs of a whole chat request: prefill of ``prompt_len`` + ``output_len - 1`` decode steps.

    Equals ``prefill_flops(shape, prompt_len + output_len - 1, lm_head_tokens=output_len)`` (see the
    module docstring). ``output_len == 0`` is a prefill without logits.
    """
    _require_int("prompt_len", prompt_len, 1)
    _require_int("output_len", output_len, 0)
    if output_len == 0:
        return prefill_flops(shape, prompt_len)
    return prefill_flops(shape, prompt_len + output_len - 1, lm_head_tokens=output_len)


def nonce_flops(shape: ModelShape, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """FLOPs of one PoC nonce: a ``seq_len``-token prefill from position 0, no LM head."""
    _require_int("seq_len", seq_len, 1)
    return prefill_flops(shape, seq_len)


def nonces_per_request(shape: ModelShape, prompt_len: int, output_len: int,
                       seq_len: int = DEFAULT_SEQ_LEN) -> float:
    """The exchange rate: FLOPs of one chat request divided by the FLOPs of one nonce."""
    return request_flops(shape, prompt_len, output_len) / nonce_flops(shape, seq_len)


# ----------------------------------------------------------------------------------------------
# Calibration against measured step times


@dataclass(frozen=True)
class BatchSegment:
    """``count`` identical sequences in one forward step, each ``n_tokens`` rows at positions
    ``context_start..``, ``lm_head_tokens`` of which run the LM head.

    A decode row is ``BatchSegment(1, context_start=ctx - 1, lm_head_tokens=1)``; 32 PoC nonces are
    ``BatchSegment(1024, count=32)``.
    """

    n_tokens: int
    context_start: int = 0
    lm_head_tokens: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        _require_int("count", self.count, 0)
        _require_int("context_start", self.context_start, 0)
        _require_int("n_tokens", self.n_tokens, 0)
        _require_int("lm_head_tokens", self.lm_head_tokens, 0)
        if self.lm_head_tokens > self.n_tokens:
            raise ValueError(f"lm_head_tokens={self.lm_head_tokens} > n_tokens={self.n_tokens}")


def step_flops(shape: ModelShape, segments: Iterable[BatchSegment]) -> int:
    """Model FLOPs of one forward step made of ``segments``."""
    return sum(seg.count * prefill_flops(shape, seg.n_tokens, seg.context_start, seg.lm_head_tokens)
               for seg in segments)


@dataclass(frozen=True)
class StepMeasurement:
    """One measured forward step: its wall time in seconds and what it computed."""

    seconds: float
    segments: tuple[BatchSegment, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be a finite positive number, got {self.seconds!r}")
        object.__setattr__(self, "segments", tuple(self.segments))
        for seg in self.segments:
            if not isinstance(seg, BatchSegment):
                raise ValueError(f"segments must be BatchSegment, got {type(seg).__name__}")


@dataclass(frozen=True)
class FlopRateFit:
    """``seconds ≈ overhead_seconds + flops / flops_per_second``, fitted to measured steps.

    Errors are relative to the measured time: ``rms_relative_error`` = sqrt(mean((pred − t)/t)²).
    """

    flops_per_second: float
    overhead_seconds: float
    rms_relative_error: float
    max_relative_error: float
    n_measurements: int

    def predict_seconds(self, flops: float) -> float:
        """Predicted wall time (s) of a step computing ``flops`` model FLOPs."""
        return self.overhead_seconds + flops / self.flops_per_second

    def seconds_per_nonce(self, shape: ModelShape, seq_len: int = DEFAULT_SEQ_LEN) -> float:
        """Marginal seconds one nonce adds to a step (the overhead is shared with chat)."""
        return nonce_flops(shape, seq_len) / self.flops_per_second


def fit_against_step_times(shape: ModelShape, measurements: Sequence[StepMeasurement],
                           fit_overhead: bool = True) -> FlopRateFit:
    """Fit an effective FLOP/s (and a per-step overhead) to measured step times; report the misfit.

    Least squares on relative error (each row weighted by 1/seconds), so short and long steps count
    alike. With ``fit_overhead`` and at least two distinct FLOP counts the overhead is fitted (clamped
    at 0 s); otherwise the fit is proportional. A large ``rms_relative_error`` means the FLOP model does
    not explain the timings (e.g. memory-bound decode steps mixed with compute-bound prefill).
    """
    measurements = list(measurements)
    if not measurements:
        raise ValueError("need at least one measurement")
    flops = np.array([float(step_flops(shape, m.segments)) for m in measurements])
    seconds = np.array([m.seconds for m in measurements])
    if np.any(flops <= 0):
        raise ValueError("every measurement must compute at least one token")
    scale = float(flops.max())
    x = flops / scale

    def proportional() -> tuple[float, float]:
        slope = float(np.sum(x / seconds) / np.sum((x / seconds) ** 2))
        return 0.0, slope

    if fit_overhead and len(np.unique(flops)) >= 2:
        design = np.stack([1.0 / seconds, x / seconds], axis=1)
        (overhead, slope), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
        overhead, slope = float(overhead), float(slope)
        if overhead < 0:
            overhead, slope = proportional()
    else:
        overhead, slope = proportional()
    if not slope > 0:
        raise ValueError("step times do not grow with FLOPs; no positive FLOP/s fits these measurements")
    predicted = overhead + slope * x
    rel = (predicted - seconds) / seconds
    return FlopRateFit(flops_per_second=scale / slope, overhead_seconds=overhead,
                       rms_relative_error=float(np.sqrt(np.mean(rel ** 2))),
                       max_relative_error=float(np.max(np.abs(rel))), n_measurements=len(measurements))


# ----------------------------------------------------------------------------------------------
# Documentation table


def worked_table(shape: ModelShape, seq_len: int = DEFAULT_SEQ_LEN,
                 lengths: Sequence[tuple[int, int]] = WORKED_TABLE_LENGTHS) -> str:
    """A markdown table of the exchange rate for ``shape`` at the given (prompt, output) lengths."""
    nonce = nonce_flops(shape, seq_len)
    nonce_attention = attention_flops(shape, seq_len)
    title = shape.name or "model"
    lines = [
        f"**{title}** (hidden {shape.hidden}, {shape.n_layers} layers, {shape.n_heads}/{shape.n_kv_heads} "
        f"heads × {shape.head_dim}"
        + (f", {shape.n_experts} experts top-{shape.experts_per_token} × {shape.moe_intermediate}"
           if shape.n_experts else f", MLP {shape.intermediate}")
        + f", vocab {shape.vocab}): linear {linear_flops_per_token(shape) / 1e9:.3f} GFLOP/token, "
        f"LM head {lm_head_flops_per_token(shape) / 1e9:.3f} GFLOP/position; one nonce (seq_len {seq_len}, "
        f"no LM head) = {nonce / 1e12:.4g} TFLOP, of which attention {nonce_attention / 1e12:.4g} TFLOP.",
        "",
        "| prompt | output | prefill TFLOP | decode TFLOP | request TFLOP | nonces per request | requests per nonce |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for prompt_len, output_len in lengths:
        total = request_flops(shape, prompt_len, output_len)
        prefill = prefill_flops(shape, prompt_len, lm_head_tokens=1 if output_len else 0)
        decode = total - prefill
        rate = total / nonce
        lines.append(f"| {prompt_len} | {output_len} | {prefill / 1e12:.4g} | {decode / 1e12:.4g} | "
                     f"{total / 1e12:.4g} | {rate:.4g} | {1 / rate:.4g} |")
    return "\n".join(lines)
