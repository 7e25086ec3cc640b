"""StepWork / StepCounter (cpoc_kernels/step_work.py): bytes read and FLOPs of a forward step, checked
against parameter counts written out matrix by matrix from the config numbers (and the model cards'
published totals), a Monte-Carlo simulation of MoE routing, and the pieces of cpoc_kernels/cost.py."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpoc_kernels import cost
from cpoc_kernels.cost import QWEN3_0_6B, QWEN3_235B_A22B, BatchSegment, ModelShape
from cpoc_kernels.sim.hardware import QWEN3_8B
from cpoc_kernels.step_work import StepCounter, StepWork, kv_bytes_per_token

BF16 = 2


def matrices_per_layer(h: int, n_heads: int, n_kv: int, hd: int) -> int:
    """q_proj, k_proj, v_proj, o_proj of one layer (GQA), in parameters."""
    q = h * n_heads * hd
    k = h * n_kv * hd
    v = h * n_kv * hd
    o = n_heads * hd * h
    return q + k + v + o


def swiglu(h: int, inter: int) -> int:
    """gate_proj, up_proj, down_proj."""
    return h * inter + h * inter + inter * h


# ------------------------------------------------------------------------------------------ dense


def dense_counts(h, layers, n_heads, n_kv, hd, inter, vocab):
    attention = layers * matrices_per_layer(h, n_heads, n_kv, hd)
    mlp = layers * swiglu(h, inter)
    return attention, mlp, vocab * h  # (attention, mlp, lm head) params


def test_dense_parameter_counts_match_the_model_cards():
    # Qwen3-0.6B: "0.6B parameters, 0.44B non-embedding"; Qwen3-8B: "8.2B, 6.95B non-embedding"
    att, mlp, head = dense_counts(1024, 28, 16, 8, 128, 3072, 151936)
    assert att + mlp == 440_401_920
    assert round((att + mlp) / 1e9, 2) == 0.44
    att8, mlp8, head8 = dense_counts(4096, 36, 32, 8, 128, 12288, 151936)
    assert round((att8 + mlp8) / 1e9, 2) == 6.95
    assert round((att8 + mlp8 + 2 * head8) / 1e9, 1) == 8.2  # untied embedding + LM head


@pytest.mark.parametrize("shape, numbers", [
    (QWEN3_0_6B, (1024, 28, 16, 8, 128, 3072, 151936)),
    (QWEN3_8B, (4096, 36, 32, 8, 128, 12288, 151936)),
])
def test_dense_bytes_read(shape, numbers):
    h, layers, n_heads, n_kv, hd, inter, vocab = numbers
    att, mlp, head = dense_counts(*numbers)
    counter = StepCounter(shape)
    kv_per_token = 2 * layers * n_kv * hd * BF16  # K and V, every layer, all KV heads, bf16
    # no LM-head row: attention + MLP only; a dense step reads every weight whatever its row count
    for tokens in (1, 7, 512, 8192):
        assert counter.weight_bytes_read(tokens, 0) == BF16 * (att + mlp)
        assert counter.weight_bytes_read(tokens, 1) == BF16 * (att + mlp + head)
    assert counter.bytes_read(StepWork(32, 32_000, 32, 32_000)) == BF16 * (att + mlp + head) + 32_000 * kv_per_token
    assert counter.bytes_read(StepWork(1024, 524_800, 0, 1024)) == BF16 * (att + mlp) + 1024 * kv_per_token
    assert counter.bytes_read(StepWork(0, 0, 0, 5000)) == 0  # an empty step reads nothing
    assert counter.weight_bytes == BF16 * (att + mlp + 2 * head)  # embedding + LM head as two matrices
    assert kv_bytes_per_token(shape) == kv_per_token


@pytest.mark.parametrize("shape, numbers", [
    (QWEN3_0_6B, (1024, 28, 16, 8, 128, 3072, 151936)),
    (QWEN3_8B, (4096, 36, 32, 8, 128, 12288, 151936)),
])
def test_dense_flops(shape, numbers):
    h, layers, n_heads, n_kv, hd, inter, vocab = numbers
    att, mlp, head = dense_counts(*numbers)
    counter = StepCounter(shape)
    per_pair = layers * 2 * (2 * n_heads * hd)  # QK^T and PV: 2·head_dim FLOPs per head each, every layer
    # one multiply-add = 2 FLOPs per parameter touched per row
    assert counter.flops(StepWork(1)) == 2 * (att + mlp)
    assert counter.flops(StepWork(1, 1, 1, 1)) == 2 * (att + mlp) + per_pair + 2 * head
    assert counter.flops(StepWork(100, 12345, 3, 0)) == 100 * 2 * (att + mlp) + 12345 * per_pair + 3 * 2 * head
    assert counter.flops(StepWork(0)) == 0


# ------------------------------------------------------------------------------------------ MoE

H, L, NH, NKV, HD, VOCAB, E, K, MI = 4096, 94, 64, 4, 128, 151936, 128, 8, 1536  # Qwen3-235B-A22B config
MOE_ATT = L * matrices_per_layer(H, NH, NKV, HD)
MOE_ROUTER = L * H * E
MOE_EXPERT = swiglu(H, MI)  # one expert of one layer
MOE_HEAD = VOCAB * H


def test_moe_parameter_counts_match_the_model_card():
    # "235B total, 22B activated, 234B non-embedding"
    total = MOE_ATT + MOE_ROUTER + L * E * MOE_EXPERT + 2 * MOE_HEAD
    assert round(total / 1e9) == 235
    assert round((total - MOE_HEAD) / 1e9) == 234
    active = MOE_ATT + MOE_ROUTER + L * K * MOE_EXPERT + 2 * MOE_HEAD
    assert round(active / 1e9) == 22
    assert StepCounter(QWEN3_235B_A22B).weight_bytes == BF16 * total


def moe_experts_read(counter: StepCounter, tokens: int) -> float:
    """Experts (summed over layers, divided by layers) a step of ``tokens`` rows reads, from its bytes."""
    dense = BF16 * (MOE_ATT + MOE_ROUTER)
    return (counter.weight_bytes_read(tokens, 0) - dense) / (BF16 * L * MOE_EXPERT)


def test_moe_one_token_reads_its_experts_and_many_tokens_read_all():
    counter = StepCounter(QWEN3_235B_A22B)
    assert counter.weight_bytes_read(1, 0) == pytest.approx(BF16 * (MOE_ATT + MOE_ROUTER + L * K * MOE_EXPERT),
                                                            rel=1e-12)
    assert counter.weight_bytes_read(1, 1) == pytest.approx(
        BF16 * (MOE_ATT + MOE_ROUTER + L * K * MOE_EXPERT + MOE_HEAD), rel=1e-12)
    assert moe_experts_read(counter, 1) == pytest.approx(K, rel=1e-9)
    # thousands of tokens: every expert of every layer (all weights but the embedding)
    assert counter.weight_bytes_read(8192, 1) == pytest.approx(counter.weight_bytes - BF16 * MOE_HEAD, rel=1e-12)
    assert moe_experts_read(counter, 8192) == pytest.approx(E, rel=1e-9)
    previous = 0.0
    for tokens in (1, 2, 3, 5, 8, 16, 32, 64, 128, 256, 1024):
        experts = moe_experts_read(counter, tokens)
        assert previous < experts <= E + 1e-9
        assert experts <= min(E, K * tokens) + 1e-9  # never more than the tokens can reach
        previous = experts


def test_moe_expert_coverage_matches_simulated_uniform_routing():
    counter = StepCounter(QWEN3_235B_A22B)
    rng = random.Random(0)
    for tokens in (2, 8, 24, 64):
        trials = 2000
        touched = 0
        for _ in range(trials):
            seen = set()
            for _ in range(tokens):
                seen.update(rng.sample(range(E), K))  # top-k: k distinct experts per token
            touched += len(seen)
        simulated = touched / trials
        assert moe_experts_read(counter, tokens) == pytest.approx(simulated, rel=0.01), tokens


def test_moe_flops_are_the_active_parameters():
    counter = StepCounter(QWEN3_235B_A22B)
    per_token = 2 * (MOE_ATT + MOE_ROUTER + L * K * MOE_EXPERT)  # only the routed experts compute
    per_pair = L * 4 * NH * HD
    assert counter.flops(StepWork(1)) == per_token
    assert counter.flops(StepWork(10, 500, 2, 77)) == 10 * per_token + 500 * per_pair + 2 * 2 * MOE_HEAD


# ------------------------------------------------------------------------------------------ tensor parallel


@pytest.mark.parametrize("tp, heads_per_card", [(1, 4), (2, 2), (4, 1), (8, 1), (3, 2)])
def test_kv_heads_split_across_the_group_at_least_one_per_card(tp, heads_per_card):
    counter = StepCounter(QWEN3_235B_A22B, tp)
    per_card = 2 * L * heads_per_card * HD * BF16
    assert kv_bytes_per_token(QWEN3_235B_A22B, tp) == per_card
    assert counter.kv_bytes_read(1000) == 1000 * per_card * tp  # the whole group: TP8 holds each KV head twice
    # weights and FLOPs are the group's whatever its size
    assert counter.weight_bytes_read(1, 1) == StepCounter(QWEN3_235B_A22B).weight_bytes_read(1, 1)
    assert counter.flops(StepWork(5, 20, 1, 20)) == StepCounter(QWEN3_235B_A22B).flops(StepWork(5, 20, 1, 20))


def test_kv_of_a_dense_model_on_more_cards_than_kv_heads():
    per_head = 2 * 36 * HD * BF16
    assert kv_bytes_per_token(QWEN3_8B, 1) == 8 * per_head
    assert kv_bytes_per_token(QWEN3_8B, 8) == per_head
    assert kv_bytes_per_token(QWEN3_8B, 16) == per_head  # one head per card, replicated
    assert StepCounter(QWEN3_8B, 16).kv_bytes_read(10) == 10 * 16 * per_head


# ------------------------------------------------------------------------------------------ cost.py pieces


@pytest.mark.parametrize("shape", [QWEN3_0_6B, QWEN3_8B, QWEN3_235B_A22B])
def test_step_flops_are_the_sum_of_the_cost_model_pieces(shape):
    counter = StepCounter(shape)
    contexts = [17, 900, 1000, 4096, 12000]
    chunk = (300, 700)  # a chat prefill chunk: 300 tokens after 700 cached, its last row samples
    poc = (256, 512)  # a PoC nonce's chunk: no LM head
    work = StepWork(tokens=chunk[0] + len(contexts) + poc[0],
                    attention_pairs=cost.attention_key_pairs(*chunk) + sum(contexts) + cost.attention_key_pairs(*poc),
                    lm_rows=1 + len(contexts), kv_tokens_read=sum(chunk) + sum(contexts) + sum(poc))
    expected = (cost.prefill_flops(shape, chunk[0], chunk[1], lm_head_tokens=1)
                + sum(cost.decode_flops(shape, c) for c in contexts)
                + cost.prefill_flops(shape, poc[0], poc[1]))
    assert counter.flops(work) == expected
    segments = [BatchSegment(chunk[0], chunk[1], 1)] + [BatchSegment(1, c - 1, 1) for c in contexts] \
        + [BatchSegment(poc[0], poc[1])]
    assert counter.flops(work) == cost.step_flops(shape, segments)
    assert counter.flops(StepWork(1024, cost.attention_key_pairs(1024))) == cost.nonce_flops(shape, 1024)


# ------------------------------------------------------------------------------------------ properties

works = st.builds(StepWork, st.integers(0, 20000), st.integers(0, 10 ** 9), st.integers(0, 20000),
                  st.integers(0, 10 ** 7))


@settings(max_examples=150, deadline=None)
@given(a=works, b=works, shape=st.sampled_from([QWEN3_0_6B, QWEN3_235B_A22B]), tp=st.sampled_from([1, 2, 8]))
def test_bytes_and_flops_grow_with_the_work(a, b, shape, tp):
    counter = StepCounter(shape, tp)
    both = a.plus(b)
    assert (both.tokens, both.attention_pairs, both.lm_rows, both.kv_tokens_read) == (
        a.tokens + b.tokens, a.attention_pairs + b.attention_pairs, a.lm_rows + b.lm_rows,
        a.kv_tokens_read + b.kv_tokens_read)
    assert counter.flops(both) == pytest.approx(counter.flops(a) + counter.flops(b), rel=1e-12)
    for x in (a, b):
        assert math.isfinite(counter.bytes_read(x)) and counter.bytes_read(x) >= 0
        if x.tokens:
            assert counter.bytes_read(both) >= counter.bytes_read(x) * (1 - 1e-12)
            assert counter.bytes_read(x) <= counter.weight_bytes + counter.kv_bytes_read(x.kv_tokens_read) + 1e-3


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, field", [
    (dict(tokens=-1), "tokens"),
    (dict(tokens=float("nan")), "tokens"),
    (dict(tokens=float("inf")), "tokens"),
    (dict(tokens=True), "tokens"),
    (dict(tokens="8"), "tokens"),
    (dict(tokens=None), "tokens"),
    (dict(tokens=4, attention_pairs=-0.5), "attention_pairs"),
    (dict(tokens=4, attention_pairs=float("nan")), "attention_pairs"),
    (dict(tokens=4, lm_rows=False), "lm_rows"),
    (dict(tokens=4, lm_rows=[1]), "lm_rows"),
    (dict(tokens=4, kv_tokens_read=-3), "kv_tokens_read"),
    (dict(tokens=4, kv_tokens_read=float("-inf")), "kv_tokens_read"),
])
def test_step_work_rejects_bad_numbers(kwargs, field):
    with pytest.raises(ValueError, match=rf"StepWork\.{field} must be a finite number >= 0"):
        StepWork(**kwargs)


@pytest.mark.parametrize("args, message", [
    ((None,), "shape must be a ModelShape"),
    (({"hidden": 1024},), "shape must be a ModelShape"),
    ((QWEN3_0_6B, 0), "tensor_parallel must be an integer >= 1"),
    ((QWEN3_0_6B, -2), "tensor_parallel must be an integer >= 1"),
    ((QWEN3_0_6B, True), "tensor_parallel must be an integer >= 1"),
    ((QWEN3_0_6B, 2.0), "tensor_parallel must be an integer >= 1"),
    ((QWEN3_0_6B, "8"), "tensor_parallel must be an integer >= 1"),
])
def test_step_counter_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        StepCounter(*args)


def test_a_tiny_shape_by_hand():
    # 1 layer, hidden 4, 2 heads of 2, 1 KV head, MLP 3, vocab 5: every count small enough to do by hand
    shape = ModelShape(hidden=4, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, intermediate=3, vocab=5)
    counter = StepCounter(shape)
    # q 4·4 + k 4·2 + v 4·2 + o 4·4 = 48; MLP 3·4·3 = 36; head 20
    assert counter.weight_bytes_read(1, 0) == 2 * 84
    assert counter.weight_bytes_read(1, 1) == 2 * 104
    assert kv_bytes_per_token(shape) == 2 * 1 * 1 * 2 * 2  # K+V · layer · head · head_dim · bf16 = 8
    assert counter.bytes_read(StepWork(2, 3, 1, 10)) == 208 + 80
    # 2 rows · 2·84 + 3 pairs · (4 · 2 heads · 2) + 1 LM row · 2·20
    assert counter.flops(StepWork(2, 3, 1, 10)) == 336 + 48 + 40
