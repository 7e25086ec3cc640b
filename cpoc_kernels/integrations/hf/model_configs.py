"""The built-in models' shapes (Qwen3 config fields). Plain data, no torch import: the CLI checks arguments
against them before anything heavy is loaded; :mod:`.models` builds the models."""
from __future__ import annotations

MODEL_CONFIGS: dict[str, dict] = {
    # Tiny enough for CPU tests and the demo; same block structure as Qwen3 (q/k norm, GQA, SwiGLU).
    "cpoc-tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # Qwen3-0.6B's shape (public config), for benchmarks; random deterministic weights.
    "qwen3-0.6b-shaped": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000,
        tie_word_embeddings=True,
    ),
}
