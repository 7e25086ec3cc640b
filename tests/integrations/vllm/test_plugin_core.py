"""Pure-Python parts of the vLLM plugin (no vLLM needed; runs in the main suite)."""
import pytest
import torch

from cpoc_kernels.integrations.vllm import version
from cpoc_kernels.integrations.vllm.client import PoCAdmission, merge_worker_records
from cpoc_kernels.governor import GovernorConfig
from cpoc_kernels.integrations.vllm.requests import (
    PoCRequestError,
    PoCRound,
    check_poc_sampling,
    parse_poc_payload,
    poc_request,
)
from cpoc_kernels.integrations.vllm.state import CpocBuffers, CpocWorkerState, RequestView

ROUND = PoCRound("block", "pubkey", seq_len=8)


@pytest.mark.parametrize("v,minor", [("0.33.0", "0.33"), ("0.32.0+cpu", "0.32"), ("0.33.1rc1.dev3+gabc", "0.33")])
def test_supported_versions(v, minor):
    assert version.check_vllm_version(v) == minor


@pytest.mark.parametrize("v", ["0.31.2", "0.34.0", "1.0.0", "dev", ""])
def test_unsupported_versions_name_the_supported_ones(v):
    with pytest.raises(version.UnsupportedVllmError, match=r"0\.32\.x, 0\.33\.x"):
        version.check_vllm_version(v)


def test_poc_request_pieces():
    spec = poc_request(ROUND, 42)
    assert spec.prompt["prompt_token_ids"] == [0] * 8
    kw = spec.sampling_kwargs
    assert kw["max_tokens"] == 1 and kw["temperature"] == 0.0 and kw["skip_reading_prefix_cache"] is True
    assert parse_poc_payload(kw["extra_args"]) == (ROUND, 42)
    salts = {poc_request(r, n).prompt["cache_salt"] for r in (ROUND, PoCRound("block", "other", 8),
                                                                PoCRound("block", "pubkey", 9)) for n in (1, 2)}
    assert len(salts) == 6  # unique per round and nonce


@pytest.mark.parametrize("extra", [{"cpoc": 3}, {"cpoc": {"v": 99}}, {"cpoc": {"v": 1, "block_hash": "b"}},
                                   {"cpoc": {**ROUND.payload(1), "nonce": 2**40}}])
def test_malformed_payloads_are_errors(extra):
    with pytest.raises(PoCRequestError):
        parse_poc_payload(extra)


def test_chat_requests_have_no_payload():
    assert parse_poc_payload(None) is None and parse_poc_payload({"other": 1}) is None


def test_prefix_cache_and_prompt_length_checks():
    check_poc_sampling(True, 1, 8, ROUND)
    with pytest.raises(PoCRequestError, match="prefix caching"):
        check_poc_sampling(False, 1, 8, ROUND)
    with pytest.raises(PoCRequestError, match="max_tokens"):
        check_poc_sampling(True, 2, 8, ROUND)
    with pytest.raises(PoCRequestError, match="seq_len"):
        check_poc_sampling(True, 1, 7, ROUND)


def _state(slots=1):
    buffers = CpocBuffers(32, 16, 2, torch.float32, "cpu", slots)
    return CpocWorkerState(buffers, 2, 16, torch.float32, "cpu")


def _view(round_, nonce):
    kw = poc_request(round_, nonce).sampling_kwargs
    return RequestView(kw["extra_args"], True, 1, round_.seq_len)


def test_row_contract_from_runner_batch():
    state = _state()
    views = {"chat": RequestView(None, None, 5, 3), "p": _view(ROUND, 7)}
    # chat decode row at 0, PoC rows 1..5 = positions 0..4
    state.begin_step(["chat", "p"], [0, 1, 6], [3, 0], views.get)
    b = state.buffers
    assert b.mask[:6].tolist() == [False, True, True, True, True, True]
    assert b.counts.tolist() == [5] and b.slot_rows(0) == [1, 2, 3, 4, 5]
    plan = state.take_logits_plan(2)
    assert plan.poc_rows == (1,) and plan.completions == () and plan.chat_rows() == [0]
    state.end_forward()
    assert not b.mask.any() and b.counts.tolist() == [0] and not b.row_mask.any()
    # rest of the nonce: positions 5..7 complete it, in flat rows 0..2
    state.begin_step(["p", "chat"], [0, 3, 4], [5, 4], views.get)
    plan = state.take_logits_plan(2)
    assert [(c.logits_row, c.nonce) for c in plan.completions] == [(0, 7)]
    assert state.take_logits_plan(2) is None  # armed once per step


def test_refusals_and_slot_exhaustion():
    state = _state(slots=1)
    other = PoCRound("other-block", "pubkey", seq_len=8)
    views = {"a": _view(ROUND, 1), "b": _view(other, 2), "late": _view(ROUND, 3)}
    state.begin_step(["a", "b", "late"], [0, 4, 8, 10], [0, 0, 2], views.get)
    records = {r["nonce"]: r["error"] for r in state.drain()}
    assert "concurrent block hashes" in records[2] and "position 2" in records[3] and 1 not in records
    assert state.buffers.counts.tolist() == [4]


def test_drain_by_keys_leaves_other_clients_records():
    """Two clients on one engine: each drains only the (round, nonce) keys it submitted."""
    state = _state(slots=1)
    other = PoCRound("other-block", "pubkey", seq_len=8)
    views = {"a": _view(ROUND, 1), "b": _view(other, 2), "c": _view(ROUND, 3), "bad": RequestView({"cpoc": 3}, True, 1, 8)}
    state.begin_step(["a", "b", "c", "bad"], [0, 4, 8, 10, 18], [0, 0, 2, 0], views.get)  # b, c, bad refused
    mine = state.drain([["other-block", "pubkey", 8, 2], ["block", "pubkey", 8, 99]])
    assert [(r["nonce"], r["block_hash"]) for r in mine] == [(2, "other-block")]
    assert state.drain([["other-block", "pubkey", 8, 2]]) == []  # taken once
    theirs = state.drain([("block", "pubkey", 8, 3)])
    assert [r["nonce"] for r in theirs] == [3]
    rest = state.drain()  # no keys: everything left (the malformed request's refusal, which has no round)
    assert len(rest) == 1 and rest[0]["nonce"] is None and "block_hash" not in rest[0]
    with pytest.raises(ValueError, match="drain keys"):
        state.drain([["block", "pubkey"]])


def test_merge_worker_records_checks_ranks_agree():
    rec = {"request_id": "r", "vector_b64": "x"}
    assert merge_worker_records([[rec], [dict(rec)]]) == [rec]
    with pytest.raises(RuntimeError, match="disagree"):
        merge_worker_records([[rec], [{"request_id": "r", "vector_b64": "y"}]])


def test_admission_follows_the_governor():
    admission = PoCAdmission(GovernorConfig(max_batch_tokens=64, kv_tokens_capacity=1000, poc_seq_len=8))
    idle = {"steps": 1, "recent_steps": [{"rows": 0, "poc_rows": 0, "seconds_since_previous": 0.01}]}
    assert admission.admit(idle) == 8  # no chat: fill the batch
    full = {"steps": 2, "recent_steps": [{"rows": 64, "poc_rows": 0, "seconds_since_previous": 0.01}]}
    assert admission.admit(full) == 0  # chat fills the batch


@pytest.fixture
def fresh_plugin_status(monkeypatch):
    import cpoc_kernels.integrations.vllm as plugin

    monkeypatch.setattr(plugin, "_status", {"registered": False, "vllm": None, "error": None})
    return plugin


def test_register_refuses_unsupported_vllm(fresh_plugin_status, monkeypatch):
    plugin = fresh_plugin_status
    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.30.1")
    with pytest.raises(version.UnsupportedVllmError, match=r"found vLLM '0\.30\.1'"):
        plugin.register()
    status = plugin.plugin_status()
    assert not status["registered"] and "0.32.x, 0.33.x" in status["error"]


def test_register_can_be_disabled(fresh_plugin_status, monkeypatch):
    plugin = fresh_plugin_status
    monkeypatch.setenv(plugin.DISABLE_ENV, "1")
    monkeypatch.setattr(version, "installed_vllm_version", lambda: pytest.fail("must not look at vLLM"))
    plugin.register()
    assert plugin.plugin_status() == {"registered": False, "vllm": None, "error": "disabled by CPOC_VLLM_DISABLE=1"}


def test_when_imported_runs_after_the_module_executed(tmp_path, monkeypatch):
    import sys

    from cpoc_kernels.integrations.vllm.seams import when_imported

    (tmp_path / "cpoc_probe_mod.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("cpoc_probe_mod", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import cpoc_probe_mod  # noqa: F401

    assert seen == [42]
    when_imported("cpoc_probe_mod", lambda m: seen.append(m.VALUE))  # already imported: runs at once
    assert seen == [42, 41]
    sys.modules.pop("cpoc_probe_mod")


def test_preempted_nonce_restarts_from_position_zero():
    """V1 recomputes a preempted request from position 0 (no prefix-cache read for PoC): start over, no refusal."""
    state = _state()
    views = {"p": _view(ROUND, 5)}
    state.begin_step(["p"], [0, 5], [0], views.get)
    state.end_forward()
    state.begin_step(["p"], [0, 8], [0], views.get)  # preempted, rescheduled whole
    plan = state.take_logits_plan(1)
    assert [(c.logits_row, c.nonce) for c in plan.completions] == [(0, 5)]
    assert state.buffers.slot_rows(0) == list(range(8)) and state.drain() == []


# ------------------------------------------------------------------------------------------ graph-safe in-model path
OTHER = PoCRound("other-block", "pubkey", seq_len=8)


def _two_round_step(state):
    """chat row 0, round ROUND rows 1..4 (positions 0..3), chat row 5, round OTHER rows 6..8 (positions 0..2)."""
    views = {"chat": RequestView(None, None, 5, 3), "p": _view(ROUND, 7), "q": _view(OTHER, 8),
             "chat2": RequestView(None, None, 5, 3)}
    state.begin_step(["chat", "p", "chat2", "q"], [0, 1, 5, 6, 9], [2, 0, 2, 0], views.get)


def _hidden_pair(n, h, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=gen), torch.randn(n, h, generator=gen) * 4


def test_reflect_rows_uses_each_slots_static_row_mask():
    from cpoc_kernels import reference as R

    state = _state(slots=2)
    _two_round_step(state)
    b = state.buffers
    assert b.slot_rows(0) == [1, 2, 3, 4] and b.slot_rows(1) == [6, 7, 8] and b.counts.tolist() == [4, 3]
    assert b.mask.nonzero().flatten().tolist() == [1, 2, 3, 4, 6, 7, 8]
    hidden, residual = _hidden_pair(12, 16, 0)  # 12 < 32 buffer rows: the forward slices the buffers by n
    h0, r0 = hidden.clone(), residual.clone()
    b.reflect_(hidden, residual, 1)
    for rows, slot in (([1, 2, 3, 4], 0), ([6, 7, 8], 1)):
        assert torch.equal(hidden[rows], R.reflect(h0[rows], b.vecs[slot, 1]))
        assert torch.equal(residual[rows], R.reflect(r0[rows], b.vecs[slot, 1]))
    chat = [0, 5, 9, 10, 11]
    assert torch.equal(hidden[chat], h0[chat]) and torch.equal(residual[chat], r0[chat])
    state.end_forward()
    assert not b.row_mask.any() and not b.mask.any()
    h1 = hidden.clone()
    b.reflect_(hidden, residual, 1)  # no PoC rows after the step: identity
    assert torch.equal(hidden, h1)
    with pytest.raises(RuntimeError, match="buffers hold 32"):
        b.reflect_(torch.zeros(33, 16), torch.zeros(33, 16), 0)


def test_in_model_poc_ops_read_nothing_on_the_host():
    """What the model forward runs (embedding select, reflection body) dispatches no host read/sync and no
    data-dependent op: CUDA-graph safe by construction."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cpoc_kernels.integrations.vllm.state import reflect_rows_impl

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    state = _state(slots=2)
    _two_round_step(state)
    b = state.buffers
    hidden, residual = _hidden_pair(10, 16, 1)
    emb = torch.zeros(10, 16)
    with Record():
        out = b.inject(emb)
        reflect_rows_impl(hidden, residual, b.vecs, b.row_mask, 0)
    host_reads = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item", "aten.index"}
    assert not host_reads & set(seen), seen
    assert seen.count("cpoc.masked_reflect_rows_mask_") == 2 and "aten.where" in seen
    assert torch.equal(out[[1, 2, 3, 4, 6, 7, 8]], b.embeds[[1, 2, 3, 4, 6, 7, 8]])


def test_compiled_in_model_path_follows_the_buffers_without_retrace():
    """fullgraph compile of embedding select + two reflections; new steps (other rows, other slots) only change
    buffer contents: no recompile, results equal eager."""
    state = _state(slots=2)
    b = state.buffers

    def forward(emb, residual):
        hidden = b.inject(emb)
        b.reflect_(hidden, residual, 0)
        b.reflect_(hidden, residual, 1)
        return hidden * 1.0, residual * 1.0

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True)
    steps = [lambda: _two_round_step(state),
             lambda: state.begin_step(["p2"], [0, 5], [0], {"p2": _view(ROUND, 9)}.get),
             lambda: state.begin_step(["c"], [0, 12], [0], {"c": RequestView(None, None, 5, 3)}.get)]
    for i, begin in enumerate(steps):
        begin()
        emb, residual = _hidden_pair(12, 16, 10 + i)
        want = forward(emb.clone(), residual.clone())
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(emb.clone(), residual.clone())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if i == 2:  # a chat-only step: everything passes through
            assert torch.equal(got[0], emb) and torch.equal(got[1], residual)
        state.end_forward()


def _engine_config(mode="FULL", device="cuda", additional=None):
    from types import SimpleNamespace as NS

    return NS(speculative_config=None, lora_config=None,
              parallel_config=NS(use_ubatching=False, prefill_context_parallel_size=1,
                                 enable_batch_sharded_sampling=False),
              cache_config=NS(kv_sharing_fast_prefill=False), model_config=NS(runner_type="generate"),
              device_config=NS(device=torch.device(device)), compilation_config=NS(cudagraph_mode=NS(name=mode)),
              additional_config=additional or {})


def test_cuda_graphs_refused_by_default_allowed_by_opt_in(monkeypatch):
    from cpoc_kernels.integrations.vllm import seams

    monkeypatch.delenv(seams.ALLOW_CUDA_GRAPHS_ENV, raising=False)
    for mode in ("FULL", "PIECEWISE", "FULL_AND_PIECEWISE"):
        with pytest.raises(version.UnsupportedVllmError, match="allow_cuda_graphs"):
            seams.check_engine_config(_engine_config(mode))
    seams.check_engine_config(_engine_config("NONE"))
    seams.check_engine_config(_engine_config("FULL", device="cpu"))
    seams.check_engine_config(_engine_config("FULL", additional={"cpoc": {"allow_cuda_graphs": True}}))
    with pytest.raises(version.UnsupportedVllmError, match="CUDA graphs"):  # only a real True opts in
        seams.check_engine_config(_engine_config("FULL", additional={"cpoc": {"allow_cuda_graphs": "no"}}))
    monkeypatch.setenv(seams.ALLOW_CUDA_GRAPHS_ENV, "1")
    seams.check_engine_config(_engine_config("FULL"))


def test_buffers_register_the_kernel_ops_before_the_first_forward(tmp_path):
    """A fresh worker process runs warm-up forwards (no PoC rows) before any row was written: the reflection op
    must be registered by attach, not by the first row write."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from cpoc_kernels.integrations.vllm.state import CpocBuffers\n"
            "b = CpocBuffers(8, 4, 2, torch.float32, 'cpu')\n"
            "h, r = torch.ones(3, 4), torch.ones(3, 4)\n"
            "b.reflect_(h, r, 0)\n"
            "assert torch.equal(h, torch.ones(3, 4)) and torch.equal(b.inject(torch.zeros(3, 4)), torch.zeros(3, 4))\n"
            "print('FORWARD-OK')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "FORWARD-OK" in out.stdout, out.stderr[-3000:]
