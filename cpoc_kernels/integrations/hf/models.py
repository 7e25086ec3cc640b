"""Built-in Qwen3-shaped models with deterministic weights (no downloads).

Weights come from our own integer RNG (the PoC ``uniform``: murmur variant keyed by parameter name,
bit-exact) mapped to U(-b, b) with IEEE fp32 multiply/subtract only, so they are identical on every
machine and torch version (no ``torch.manual_seed`` initialisation, no transcendental functions).
"""
from __future__ import annotations

import math

import torch

from cpoc_kernels._native import native
from cpoc_kernels.reference.rng import uniform
from cpoc_kernels.reference.seeds import seed32

from .model_configs import MODEL_CONFIGS

WEIGHT_SEED_PREFIX = "cpoc-weights-v1"


def deterministic_uniform_(param: torch.Tensor, name: str, bound: float) -> None:
    """Fill ``param`` with fp32 (2·uniform(seed32(prefix/name), n) − 1)·bound, then cast. Bit-exact."""
    n, seed = param.numel(), seed32(f"{WEIGHT_SEED_PREFIX}/{name}")
    lib = native()
    u = torch.from_numpy(lib.uniform(seed, n)) if lib is not None else uniform(seed, n)
    values = (u * 2.0 - 1.0) * bound
    with torch.no_grad():
        param.copy_(values.view(param.shape).to(param.dtype))


def init_deterministic_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter of ``model`` its deterministic value: norms 1, matrices U(±√(3/fan_in))."""
    for name, param in model.named_parameters():
        if param.dim() == 1:
            with torch.no_grad():
                param.fill_(1.0)
        else:
            fan_in = param.shape[1] if "embed_tokens" not in name else 1
            deterministic_uniform_(param, name, math.sqrt(3.0 / fan_in))
    return model


def build_model(name: str = "cpoc-tiny", dtype: torch.dtype = torch.float32, device="cpu", **overrides):
    """A Qwen3ForCausalLM of a built-in shape with deterministic weights, in eval mode.

    ``overrides`` change config fields (e.g. ``num_hidden_layers=2``). Unknown names → ValueError.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    config = Qwen3Config(**{**MODEL_CONFIGS[name], **overrides})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to_empty(device=device)
    # Built on meta to skip torch's random init; the RoPE buffers are recomputed for real.
    model.model.rotary_emb = Qwen3RotaryEmbedding(config).to(device)
    init_deterministic_(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval().requires_grad_(False)
