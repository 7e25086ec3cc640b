"""vLLM 0.33's real Qwen3 model object on CPU with the cpoc seams (run in the vLLM 0.33 venv: .ci/vllm_model.sh).

PoC rows are compared with the package's HF reference path (:class:`PoCRunner`, same weights), chat rows
with ``torch.equal`` (PoC on vs off in the same model). Eager and compiled (DYNAMO_TRACE_ONCE + inductor).
"""
import os
import sys

import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import vllm_model_harness as h  # noqa: E402
from artifact_match import assert_artifacts_close  # noqa: E402

import cpoc_kernels.integrations.vllm as plugin  # noqa: E402
from cpoc_kernels.integrations.hf.runner import PoCRunner  # noqa: E402
from cpoc_kernels.integrations.vllm import seams  # noqa: E402
from cpoc_kernels.integrations.vllm.requests import PoCRound, poc_request  # noqa: E402

ROUND = PoCRound("cpoc-test-block", "cpoc-test-pubkey", seq_len=16)
TOL = 1e-6  # eager: |diff| <= 1e-6 * max(1, |want|)
TOL_COMPILED = 2e-6  # inductor fuses the norms/MLP differently from HF eager (measured up to 1.1e-6 relative)


def assert_close_fp32(got, want, tol=TOL):
    """PoC states vs the HF reference: |diff| <= tol * max(1, |want|) (fp32 rounding scales with magnitude)."""
    bound = tol * torch.clamp(want.abs(), min=1.0)
    excess = ((got - want).abs() - bound).max().item()
    assert excess <= 0, f"max |diff| {(got - want).abs().max().item():.3g} exceeds the {tol:g} relative bound"


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    plugin.register()
    path = str(tmp_path_factory.mktemp("tiny"))
    return h.save_hf_model(path), path


@pytest.fixture(scope="module")
def reference(hf_and_dir):
    runner = PoCRunner(hf_and_dir[0], ROUND.block_hash, ROUND.public_key, ROUND.seq_len)
    return runner


def _build(hf_and_dir, compile=False):
    hf, path = hf_and_dir
    cfg, model = h.build_vllm_qwen3(path, hf, compile=compile)
    state = seams.attach(model, cfg)
    return cfg, model, state


@pytest.fixture(scope="module")
def eager(hf_and_dir):
    return _build(hf_and_dir)


CHAT_A = [5, 17, 3, 99, 42, 7, 1, 250, 33]
CHAT_B = [11, 12, 13, 400, 2]


def mixed_batch(n1=101, n2=-7, tag=""):
    """[chat A (prefill), PoC n1 (whole), chat B (prefill), PoC n2 (whole)]; ``tag`` makes request ids fresh."""
    return [
        h.Req("chat-a" + tag, 0, len(CHAT_A), tokens=CHAT_A),
        h.Req("poc-1" + tag, 0, ROUND.seq_len, spec=poc_request(ROUND, n1)),
        h.Req("chat-b" + tag, 0, len(CHAT_B), tokens=CHAT_B),
        h.Req("poc-2" + tag, 0, ROUND.seq_len, spec=poc_request(ROUND, n2)),
    ]


def _rows(out, i):
    return out.hidden[out.query_start_loc[i] : out.query_start_loc[i + 1]]


def test_oot_layers_in_use_and_marked(eager):
    _, model, state = eager
    inner = model.model
    assert type(inner.embed_tokens).__name__ == "CpocVocabParallelEmbedding"
    assert type(model.logits_processor).__name__ == "CpocLogitsProcessor"
    assert type(model.lm_head).__name__ == "ParallelLMHead"  # the LM head itself is untouched
    norms = [layer.input_layernorm for layer in inner.layers]
    assert [n._cpoc_layer for n in norms[1:]] == list(range(len(norms) - 1))
    assert norms[0]._cpoc_buffers is None  # layer 0 gets the raw embeddings
    assert inner.norm._cpoc_layer == len(norms) - 1
    assert state.marked_norms == len(norms) and state.has_logits_stage
    assert inner.layers[0].self_attn.q_norm._cpoc_buffers is None  # other RMSNorms untouched
    assert isinstance(inner.cpoc, torch.nn.Module) and "mask" in dict(inner.cpoc.named_buffers())


def test_chat_only_matches_hf(eager, hf_and_dir):
    cfg, model, state = eager
    h.AttentionContext.reset()
    out = h.run_step(model, cfg, state, [h.Req("chat-a", 0, len(CHAT_A), tokens=CHAT_A)])
    with torch.inference_mode():
        ref = hf_and_dir[0].model(input_ids=torch.tensor([CHAT_A])).last_hidden_state[0]
    assert (out.hidden - ref).abs().max().item() < 1e-5


def _check_artifacts(state, reference, nonces):
    records = {r["nonce"]: r for r in state.drain()}
    assert sorted(records) == sorted(nonces), records
    expected = {a.nonce: a.vector_b64 for a in reference.run(nonces)}
    assert_artifacts_close({n: records[n]["vector_b64"] for n in nonces}, expected)  # fp16 of states within 1e-6


def test_mixed_batch_poc_rows_match_hf_reference(eager, reference):
    cfg, model, state = eager
    h.AttentionContext.reset()
    state.drain()
    out = h.run_step(model, cfg, state, mixed_batch())
    ref = reference.hidden_states([101, -7])
    assert_close_fp32(_rows(out, 1)[-1], ref[0])
    assert_close_fp32(_rows(out, 3)[-1], ref[1])
    _check_artifacts(state, reference, [101, -7])


def test_chat_rows_equal_with_poc_on_and_off(eager):
    cfg, model, state = eager
    h.AttentionContext.reset()
    on = h.run_step(model, cfg, state, mixed_batch(tag="-on"), poc_on=True)
    h.AttentionContext.reset()
    off = h.run_step(model, cfg, state, mixed_batch(tag="-off"), poc_on=False)
    state.drain()
    assert torch.equal(_rows(on, 0), _rows(off, 0))
    assert torch.equal(_rows(on, 2), _rows(off, 2))
    assert not torch.equal(_rows(on, 1), _rows(off, 1))  # the PoC rows did change


def test_lm_head_runs_on_chat_rows_only(eager):
    cfg, model, state = eager
    h.AttentionContext.reset()
    before = state.counters["lm_head_rows"]
    out = h.run_step(model, cfg, state, mixed_batch(tag="-lm"))
    state.drain()
    assert state.counters["lm_head_rows"] - before == 2
    assert out.plan_used
    assert torch.count_nonzero(out.logits[[1, 3]]) == 0
    last = torch.tensor(out.query_start_loc[1:]) - 1
    with torch.inference_mode():
        direct = model.compute_logits(out.hidden[last[[0, 2]]])  # no plan armed: plain LM head on chat rows
    assert torch.equal(out.logits[[0, 2]], direct)
    assert out.logits.argmax(-1)[[1, 3]].tolist() == [0, 0]


def test_chunked_prefill_matches_one_shot(eager, reference):
    cfg, model, state = eager
    h.AttentionContext.reset()
    state.drain()
    spec = poc_request(ROUND, 55)
    first = [h.Req("chat-a", 0, 4, tokens=CHAT_A), h.Req("poc-c", 0, 6, spec=spec)]
    h.run_step(model, cfg, state, first)
    assert state.drain() == []  # not complete yet: nothing read out
    second = [h.Req("chat-a", 4, 5, tokens=CHAT_A), h.Req("poc-c", 6, 10, spec=spec),
              h.Req("chat-b", 0, 5, tokens=CHAT_B)]
    out = h.run_step(model, cfg, state, second)
    ref = reference.hidden_states([55])
    assert_close_fp32(_rows(out, 1)[-1], ref[0])
    _check_artifacts(state, reference, [55])


def _padded_step_matches(cfg, model, state, reference, tol):
    """A forward padded beyond the batch (as a CUDA-graph replay pads to a captured size): the static buffers are
    sliced by the padded row count, padding rows are chat (mask 0), PoC rows and artifacts unchanged."""
    h.AttentionContext.reset()
    state.drain()
    out = h.run_step(model, cfg, state, mixed_batch(tag="-pad" + str(tol)), pad_rows=7)
    n_real = out.query_start_loc[-1]
    assert out.hidden.shape[0] == n_real + 7 and out.plan_used
    ref = reference.hidden_states([101, -7])
    assert_close_fp32(_rows(out, 1)[-1], ref[0], tol)
    assert_close_fp32(_rows(out, 3)[-1], ref[1], tol)
    _check_artifacts(state, reference, [101, -7])
    assert not state.buffers.row_mask.any() and not state.buffers.mask.any()


def test_padded_forward_eager(eager, reference):
    _padded_step_matches(*eager, reference, TOL)


def test_bad_poc_requests_are_refused_never_wrong(eager):
    cfg, model, state = eager
    h.AttentionContext.reset()
    state.drain()
    reqs = [
        h.Req("cached", 0, ROUND.seq_len, spec=poc_request(ROUND, 1), skip_reading_prefix_cache=False),
        h.Req("midway", 0, 4, spec=poc_request(ROUND, 2)),
        h.Req("short", 0, ROUND.seq_len, spec=poc_request(ROUND, 3), prompt_len=ROUND.seq_len - 1),
    ]
    # "midway" starts at position 4 as if its first rows came from the prefix cache
    reqs[1].position = 4
    for layer in h.AttentionContext.layers:
        h.AttentionContext.kv[("midway", layer)] = (torch.zeros(4, 2, 16), torch.zeros(4, 2, 16))
    h.run_step(model, cfg, state, reqs)
    records = {r["nonce"]: r for r in state.drain()}
    assert set(records) == {1, 2, 3}
    assert all(r["vector_b64"] is None and r["error"] for r in records.values())
    assert "skip_reading_prefix_cache" in records[1]["error"]
    assert "position 4" in records[2]["error"]
    assert "seq_len" in records[3]["error"]


@pytest.fixture(scope="module")
def compiled(hf_and_dir):
    return _build(hf_and_dir, compile=True)


def test_compiled_poc_rows_match_and_chat_rows_equal(compiled, reference):
    cfg, model, state = compiled
    h.AttentionContext.reset()
    state.drain()
    torch._dynamo.utils.counters.clear()
    on = h.run_step(model, cfg, state, mixed_batch(tag="-c1"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the model really went through dynamo
    ref = reference.hidden_states([101, -7])
    assert_close_fp32(_rows(on, 1)[-1], ref[0], TOL_COMPILED)
    assert_close_fp32(_rows(on, 3)[-1], ref[1], TOL_COMPILED)
    _check_artifacts(state, reference, [101, -7])
    h.AttentionContext.reset()
    off = h.run_step(model, cfg, state, mixed_batch(tag="-c2"), poc_on=False)
    assert torch.equal(_rows(on, 0), _rows(off, 0)) and torch.equal(_rows(on, 2), _rows(off, 2))
    assert not torch.equal(_rows(on, 1), _rows(off, 1))


def test_padded_forward_compiled(compiled, reference):
    _padded_step_matches(*compiled, reference, TOL_COMPILED)


def test_compiled_buffers_update_in_place_without_retrace(compiled, reference):
    """Different row counts, positions and a new block hash (new layer vectors) on the same compiled graph."""
    cfg, model, state = compiled
    other = PoCRound("cpoc-other-block", ROUND.public_key, seq_len=ROUND.seq_len)
    h.AttentionContext.reset()
    state.drain()
    spec = poc_request(other, 9)
    torch._dynamo.utils.counters.clear()
    h.run_step(model, cfg, state, [h.Req("c-a", 0, 3, tokens=CHAT_B), h.Req("c-p", 0, 11, spec=spec)])
    out = h.run_step(model, cfg, state, [h.Req("c-p", 11, 5, spec=spec), h.Req("c-a", 3, 2, tokens=CHAT_B)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # no retrace for new sizes/buffers
    runner = PoCRunner(reference.model, other.block_hash, other.public_key, other.seq_len)
    assert_close_fp32(_rows(out, 0)[-1], runner.hidden_states([9])[0], TOL_COMPILED)
    _check_artifacts(state, runner, [9])


def test_mrv2_model_state_glue(eager, reference, monkeypatch):
    """MRV2: the wrapped resolver gives the Cpoc ModelState; add_request reads NewRequestData; prepare_inputs on a
    real InputBatch builds the rows (a nonce chunked 10 + 6 with chat); remove_request forgets."""
    import dataclasses

    import numpy as np
    from vllm import SamplingParams
    from vllm.forward_context import set_forward_context
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu import model_states
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    cfg, model, state = eager
    assert model_states.resolve_model_state_cls._cpoc_wrapped
    monkeypatch.setattr(cfg.parallel_config, "worker_extension_cls", plugin.WORKER_EXTENSION)
    ms = model_states.init_model_state(cfg, model, None, torch.device("cpu"))
    assert type(ms).__name__ == "CpocDefaultModelState" and ms._cpoc_state is state  # attach is idempotent
    spec = poc_request(ROUND, 77)

    def new_req(rid, ids, sp):
        return NewRequestData(req_id=rid, prompt_token_ids=ids, mm_features=[], sampling_params=sp,
                              pooling_params=None, block_ids=([],), num_computed_tokens=0, lora_request=None)

    ms.add_request(0, new_req("m-chat", CHAT_A, SamplingParams(max_tokens=4)))
    ms.add_request(1, new_req("m-poc", spec.prompt["prompt_token_ids"], SamplingParams(**spec.sampling_kwargs)))
    dummy = InputBatch.make_dummy(2, 16, InputBuffers(8, 64, torch.device("cpu")))
    h.AttentionContext.reset()
    state.drain()

    def step(reqs):
        qsl = np.cumsum([0] + [r.n_rows for r in reqs]).astype(np.int32)
        batch = dataclasses.replace(dummy, req_ids=[r.request_id for r in reqs], num_reqs=len(reqs),
                                    query_start_loc_np=qsl,
                                    num_computed_tokens_np=np.array([r.position for r in reqs], dtype=np.int32))
        assert ms.prepare_inputs(batch, None) == {}
        h.AttentionContext.segments = [h.Segment(r.request_id, int(qsl[i]), r.n_rows, r.position)
                                       for i, r in enumerate(reqs)]
        ids = [t for r in reqs for t in (r.tokens[r.position:r.position + r.n_rows] if r.tokens else [0] * r.n_rows)]
        pos = [p for r in reqs for p in range(r.position, r.position + r.n_rows)]
        with torch.inference_mode(), set_forward_context(None, cfg):
            hidden = model(input_ids=torch.tensor(ids), positions=torch.tensor(pos))
            model.compute_logits(hidden[torch.tensor(qsl[1:]) - 1])
        return hidden, qsl

    step([h.Req("m-chat", 0, 5, tokens=CHAT_A), h.Req("m-poc", 0, 10, spec=spec)])
    assert state.drain() == []
    hidden, qsl = step([h.Req("m-poc", 10, 6, spec=spec), h.Req("m-chat", 5, 4, tokens=CHAT_A)])
    assert_close_fp32(hidden[qsl[1] - 1], reference.hidden_states([77])[0])
    _check_artifacts(state, reference, [77])
    ms.remove_request("m-poc")
    ms.remove_request("m-chat")
    assert ms._cpoc_views == {} and "m-poc" not in state.known_request_ids()
    ms.prepare_dummy_inputs(2, 16)
    assert not state.buffers.mask.any() and state.buffers.counts.sum() == 0 and not state.buffers.row_mask.any()
