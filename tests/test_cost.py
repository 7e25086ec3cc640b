"""FLOP model and exchange rate (cpoc_kernels/cost.py), checked against counts written out by hand."""
from __future__ import annotations

import random

import pytest

from cpoc_kernels import cost
from cpoc_kernels.cost import (
    QWEN3_0_6B,
    QWEN3_235B_A22B,
    BatchSegment,
    ModelShape,
    StepMeasurement,
)

DENSE_TOY = ModelShape(hidden=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, intermediate=12, vocab=20)
MOE_TOY = ModelShape(hidden=8, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=4, intermediate=0, vocab=20,
                     n_experts=4, experts_per_token=2, moe_intermediate=6)


def matmul_flops(rows_in: int, cols_out: int) -> int:
    """One token through a rows_in × cols_out weight: one multiply and one add per weight."""
    multiplies = rows_in * cols_out
    adds = rows_in * cols_out
    return multiplies + adds


def hand_token_flops(shape: ModelShape, position: int, logits: bool, moe_layers: set[int]) -> int:
    """One token at ``position`` through every layer, written out matrix by matrix and key by key."""
    h, hd = shape.hidden, shape.head_dim
    total = 0
    for layer in range(shape.n_layers):
        total += matmul_flops(h, shape.n_heads * hd)      # q
        total += matmul_flops(h, shape.n_kv_heads * hd)   # k
        total += matmul_flops(h, shape.n_kv_heads * hd)   # v
        total += matmul_flops(shape.n_heads * hd, h)      # o
        for _head in range(shape.n_heads):
            for _key in range(position + 1):              # causal: keys 0..position
                total += 2 * hd                           # q·k
                total += 2 * hd                           # p·v
        if layer in moe_layers:
            total += matmul_flops(h, shape.n_experts)     # router
            for _expert in range(shape.experts_per_token):
                total += matmul_flops(h, shape.moe_intermediate)  # gate
                total += matmul_flops(h, shape.moe_intermediate)  # up
                total += matmul_flops(shape.moe_intermediate, h)  # down
        else:
            total += matmul_flops(h, shape.intermediate)
            total += matmul_flops(h, shape.intermediate)
            total += matmul_flops(shape.intermediate, h)
    if logits:
        total += matmul_flops(h, shape.vocab)
    return total


def moe_layer_set(shape: ModelShape) -> set[int]:
    return set(range(shape.n_layers)) if shape.n_experts else set()


@pytest.mark.parametrize("shape", [DENSE_TOY, MOE_TOY])
@pytest.mark.parametrize("n_tokens,context_start,lm_head_tokens", [(1, 0, 0), (5, 0, 0), (3, 7, 1), (6, 2, 6)])
def test_prefill_matches_hand_count(shape, n_tokens, context_start, lm_head_tokens):
    positions = range(context_start, context_start + n_tokens)
    # LM head on the last lm_head_tokens positions (which positions does not change the count)
    expected = sum(hand_token_flops(shape, p, logits=(p >= context_start + n_tokens - lm_head_tokens),
                                    moe_layers=moe_layer_set(shape))
                   for p in positions)
    assert cost.prefill_flops(shape, n_tokens, context_start, lm_head_tokens) == expected


@pytest.mark.parametrize("shape", [DENSE_TOY, MOE_TOY])
def test_decode_is_one_token_with_logits(shape):
    for context_len in (1, 2, 9):
        expected = hand_token_flops(shape, context_len - 1, logits=True, moe_layers=moe_layer_set(shape))
        assert cost.decode_flops(shape, context_len) == expected


@pytest.mark.parametrize("shape", [DENSE_TOY, MOE_TOY])
@pytest.mark.parametrize("prompt_len,output_len", [(1, 1), (4, 1), (4, 6), (10, 3), (3, 0)])
def test_request_is_prefill_plus_decode_steps(shape, prompt_len, output_len):
    expected = cost.prefill_flops(shape, prompt_len, lm_head_tokens=1 if output_len else 0)
    for step in range(1, output_len):           # output token 1 comes from the prefill's logits
        expected += cost.decode_flops(shape, context_len=prompt_len + step)
    assert cost.request_flops(shape, prompt_len, output_len) == expected


def test_nonce_has_no_lm_head():
    seq_len = 16
    expected = sum(hand_token_flops(DENSE_TOY, p, logits=False, moe_layers=set()) for p in range(seq_len))
    assert cost.nonce_flops(DENSE_TOY, seq_len) == expected


def test_exchange_rate_is_request_over_nonce():
    for prompt_len, output_len, seq_len in [(5, 5, 8), (100, 1, 16), (3, 40, 32)]:
        rate = cost.nonces_per_request(MOE_TOY, prompt_len, output_len, seq_len)
        assert rate == pytest.approx(cost.request_flops(MOE_TOY, prompt_len, output_len)
                                     / cost.nonce_flops(MOE_TOY, seq_len), rel=1e-15)
    # a request whose prompt is one nonce and which samples one token costs one nonce plus one LM head
    seq_len = 64
    rate = cost.nonces_per_request(QWEN3_0_6B, seq_len, 1, seq_len)
    lm_head = matmul_flops(QWEN3_0_6B.hidden, QWEN3_0_6B.vocab)
    assert rate == pytest.approx(1 + lm_head / cost.nonce_flops(QWEN3_0_6B, seq_len), rel=1e-12)


@pytest.mark.parametrize("shape", [QWEN3_0_6B, QWEN3_235B_A22B, MOE_TOY])
def test_monotonic(shape):
    lengths = [1, 2, 16, 128, 1000, 4096]
    for a, b in zip(lengths, lengths[1:]):
        assert cost.nonce_flops(shape, a) < cost.nonce_flops(shape, b)
        assert cost.nonces_per_request(shape, a, 10) < cost.nonces_per_request(shape, b, 10)
        assert cost.nonces_per_request(shape, 10, a) < cost.nonces_per_request(shape, 10, b)
        assert cost.decode_flops(shape, a) < cost.decode_flops(shape, b)
    # a longer nonce makes every request worth fewer nonces
    assert cost.nonces_per_request(shape, 512, 512, 2048) < cost.nonces_per_request(shape, 512, 512, 1024)
    # attention is superlinear: per-token cost grows with length
    assert cost.nonce_flops(shape, 4096) / 4096 > cost.nonce_flops(shape, 1024) / 1024


def test_moe_counts_only_active_experts():
    more_experts = ModelShape(**{**MOE_TOY.__dict__, "n_experts": 64})
    # 60 more (inactive) experts add only router columns
    delta = cost.linear_flops_per_token(more_experts) - cost.linear_flops_per_token(MOE_TOY)
    assert delta == MOE_TOY.n_layers * matmul_flops(MOE_TOY.hidden, 60)
    one_more_active = ModelShape(**{**MOE_TOY.__dict__, "experts_per_token": 3})
    delta = cost.linear_flops_per_token(one_more_active) - cost.linear_flops_per_token(MOE_TOY)
    expert = 2 * matmul_flops(MOE_TOY.hidden, MOE_TOY.moe_intermediate) + matmul_flops(MOE_TOY.moe_intermediate,
                                                                                        MOE_TOY.hidden)
    assert delta == MOE_TOY.n_layers * expert


def test_mixed_dense_and_moe_layers_from_hf_config():
    config = {"hidden_size": 8, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 4, "intermediate_size": 12, "vocab_size": 20, "num_experts": 4,
              "num_experts_per_tok": 2, "moe_intermediate_size": 6, "decoder_sparse_step": 2,
              "mlp_only_layers": [3]}
    shape = ModelShape.from_hf_config(config)
    moe_layers = {i for i in range(6) if i != 3 and (i + 1) % 2 == 0}   # {1, 5}
    assert shape.moe_layer_count == len(moe_layers) == 2
    assert shape.dense_layer_count == 4
    expected = sum(hand_token_flops(shape, p, logits=False, moe_layers=moe_layers) for p in range(7))
    assert cost.nonce_flops(shape, 7) == expected


def test_presets_match_transformers_configs():
    transformers = pytest.importorskip("transformers")
    dense = transformers.Qwen3Config(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                     num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                                     vocab_size=151936)
    moe = transformers.Qwen3MoeConfig(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                                      num_key_value_heads=4, head_dim=128, intermediate_size=12288,
                                      vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                                      moe_intermediate_size=1536, decoder_sparse_step=1, mlp_only_layers=[])
    assert ModelShape.from_hf_config(dense) == QWEN3_0_6B
    assert ModelShape.from_hf_config(moe) == QWEN3_235B_A22B


def test_presets_match_published_parameter_counts():
    # Qwen3-0.6B model card: 0.44B non-embedding parameters.
    assert cost.linear_flops_per_token(QWEN3_0_6B) / 2 == pytest.approx(0.44e9, rel=0.01)
    # Qwen3-235B-A22B model card: 235B total, 22B activated (embedding and LM head included).
    s = QWEN3_235B_A22B
    embeddings = 2 * s.vocab * s.hidden
    attention = s.n_layers * s.hidden * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
    all_experts = s.n_layers * (s.n_experts * 3 * s.hidden * s.moe_intermediate + s.hidden * s.n_experts)
    assert attention + all_experts + embeddings == pytest.approx(235e9, rel=0.01)
    activated = cost.linear_flops_per_token(s) / 2 + embeddings
    assert activated == pytest.approx(22e9, rel=0.02)


def test_qwen3_235b_nonce_matches_spec_estimate():
    # pocv2_algorithm.md §12: "≈ 2·22e9·1024 ≈ 45 TFLOP/nonce (+~1.6 TFLOP attention)"; the 22B there
    # includes the embedding and LM head, which a nonce does not run.
    assert cost.attention_flops(QWEN3_235B_A22B, 1024) == pytest.approx(1.6e12, rel=0.02)
    assert cost.nonce_flops(QWEN3_235B_A22B, 1024) == pytest.approx(45e12, rel=0.03)


def _synthetic_measurements(shape, flops_per_second, overhead, noise, rng):
    out = []
    for _ in range(40):
        segments = (BatchSegment(rng.choice([64, 256, 1024]), count=rng.randint(1, 8)),
                    BatchSegment(1, context_start=rng.randint(0, 4000), lm_head_tokens=1,
                                 count=rng.randint(0, 64)))
        seconds = overhead + cost.step_flops(shape, segments) / flops_per_second
        out.append(StepMeasurement(seconds * (1 + rng.gauss(0, noise)), segments))
    return out


def test_fit_recovers_flop_rate_and_overhead():
    rng = random.Random(1)
    measurements = _synthetic_measurements(QWEN3_0_6B, 3.0e14, 4e-3, 0.0, rng)
    fit = cost.fit_against_step_times(QWEN3_0_6B, measurements)
    assert fit.flops_per_second == pytest.approx(3.0e14, rel=1e-9)
    assert fit.overhead_seconds == pytest.approx(4e-3, rel=1e-9)
    assert fit.rms_relative_error < 1e-9
    noisy = cost.fit_against_step_times(QWEN3_0_6B, _synthetic_measurements(QWEN3_0_6B, 3.0e14, 4e-3, 0.02, rng))
    assert noisy.flops_per_second == pytest.approx(3.0e14, rel=0.05)
    assert 0.01 < noisy.rms_relative_error < 0.04
    one_nonce = cost.nonce_flops(QWEN3_0_6B, 1024) / 3.0e14
    assert fit.seconds_per_nonce(QWEN3_0_6B) == pytest.approx(one_nonce, rel=1e-9)
    segments = (BatchSegment(1024, count=4),)
    assert fit.predict_seconds(cost.step_flops(QWEN3_0_6B, segments)) == pytest.approx(4e-3 + 4 * one_nonce)


def test_fit_proportional_and_misfit_reported():
    rng = random.Random(2)
    measurements = _synthetic_measurements(QWEN3_0_6B, 1.0e14, 0.0, 0.0, rng)
    fit = cost.fit_against_step_times(QWEN3_0_6B, measurements, fit_overhead=False)
    assert fit.overhead_seconds == 0.0
    assert fit.flops_per_second == pytest.approx(1.0e14, rel=1e-9)
    # memory-bound decode steps (constant time regardless of FLOPs) are not explained by a FLOP rate
    decode_only = [StepMeasurement(0.010, (BatchSegment(1, context_start=c, lm_head_tokens=1, count=b),))
                   for b, c in [(1, 100), (8, 100), (64, 2000), (128, 8000)]]
    prefill = [StepMeasurement(cost.step_flops(QWEN3_0_6B, s) / 1e14, s)
               for s in [(BatchSegment(1024, count=8),), (BatchSegment(1024, count=16),)]]
    consistent = cost.fit_against_step_times(QWEN3_0_6B, prefill)
    assert consistent.rms_relative_error < 1e-9
    assert cost.fit_against_step_times(QWEN3_0_6B, decode_only + prefill).rms_relative_error > 0.05
    proportional = cost.fit_against_step_times(QWEN3_0_6B, decode_only + prefill, fit_overhead=False)
    assert proportional.rms_relative_error > 0.5


def test_worked_table_rows():
    table = cost.worked_table(QWEN3_235B_A22B, seq_len=1024)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(cost.WORKED_TABLE_LENGTHS)
    for row, (prompt_len, output_len) in zip(rows, cost.WORKED_TABLE_LENGTHS):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert (int(cells[0]), int(cells[1])) == (prompt_len, output_len)
        assert float(cells[4]) * 1e12 == pytest.approx(cost.request_flops(QWEN3_235B_A22B, prompt_len, output_len),
                                                       rel=1e-3)
        assert float(cells[5]) == pytest.approx(cost.nonces_per_request(QWEN3_235B_A22B, prompt_len, output_len),
                                                rel=1e-3)
        assert float(cells[2]) + float(cells[3]) == pytest.approx(float(cells[4]), rel=2e-3)
    assert "Qwen3-235B-A22B" in table


def test_bad_input_raises():
    with pytest.raises(ValueError):
        ModelShape(hidden=0, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1, intermediate=1, vocab=1)
    with pytest.raises(ValueError):
        ModelShape(hidden=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, intermediate=0, vocab=4,
                   n_experts=4, experts_per_token=5, moe_intermediate=2)
    with pytest.raises(ValueError):
        ModelShape.from_hf_config({"hidden_size": 8})
    with pytest.raises(ValueError):
        cost.prefill_flops(DENSE_TOY, -1)
    with pytest.raises(ValueError):
        cost.prefill_flops(DENSE_TOY, 2, lm_head_tokens=3)
    with pytest.raises(ValueError):
        cost.decode_flops(DENSE_TOY, 0)
    with pytest.raises(ValueError):
        cost.request_flops(DENSE_TOY, 0, 5)
    with pytest.raises(ValueError):
        cost.nonces_per_request(DENSE_TOY, 5, 5, seq_len=0)
    with pytest.raises(ValueError):
        cost.nonce_flops(DENSE_TOY, 1.5)
    with pytest.raises(ValueError):
        cost.fit_against_step_times(DENSE_TOY, [])
    with pytest.raises(ValueError):
        StepMeasurement(-1.0, (BatchSegment(4),))
    with pytest.raises(ValueError):
        cost.fit_against_step_times(DENSE_TOY, [StepMeasurement(1.0, (BatchSegment(4),)),
                                                StepMeasurement(0.5, (BatchSegment(40),))])
