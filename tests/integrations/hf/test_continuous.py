"""Continuous PoC inside transformers' continuous batching (CPU, fp32, cpoc-tiny).

Artifacts must equal a pure-PoC run (PoCRunner, plain [B, S, H] batches), chat must be untouched (greedy
tokens identical with PoC on/off, no PoC in chat outputs, no PoC row at the LM head), a crash inside PoC
handling must stop PoC only, and the governor in ``off`` mode must add no PoC row.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import GenerationConfig  # noqa: E402

from cpoc_kernels.cost import ModelShape  # noqa: E402
from cpoc_kernels.governor import Governor  # noqa: E402
from cpoc_kernels.integrations.hf import continuous  # noqa: E402
from cpoc_kernels.integrations.hf.continuous import ContinuousPoC, cb_config  # noqa: E402
from cpoc_kernels.integrations.hf.continuous.hooks import ForwardHooks  # noqa: E402
from cpoc_kernels.integrations.hf.continuous.scheduling import PoCScheduler  # noqa: E402
from cpoc_kernels.integrations.hf.models import build_model  # noqa: E402
from cpoc_kernels.integrations.hf.runner import PoCRunner  # noqa: E402
from cpoc_kernels.validate import validate  # noqa: E402

BH, PK = "0x7c1e-continuous-test-block", "cpoc-test-node-pubkey"
SEQ_LEN = 40
MAX_BATCH_TOKENS = 32  # < SEQ_LEN: every nonce is prefilled in at least two chunks
TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("cpoc-tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def pure(model):
    """Pure-PoC artifacts, {nonce: fp16 vector}, computed once per nonce set."""
    cache: dict[tuple[int, ...], dict[int, np.ndarray]] = {}

    def get(nonces):
        key = tuple(nonces)
        if key not in cache:
            arts = PoCRunner(model, BH, PK, SEQ_LEN, batch_size=8).run(nonces)
            cache[key] = {a.nonce: a.vector() for a in arts}
        return cache[key]

    return get


def chat_workload(seed: int, n: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 500, size=int(rng.integers(3, 30))).tolist() for _ in range(n)]
    max_new = [int(rng.integers(2, 8)) for _ in range(n)]
    return prompts, max_new


class Probe:
    """Test-side hooks (registered after ContinuousPoC's): which rows are PoC, what reaches the LM head."""

    def __init__(self, model, manager):
        self.manager = manager
        self.poc_rows: set[int] = set()
        self.final = None
        self.lm_rows = 0
        self.lm_poc_rows = 0
        self.chat_rows_per_step: list[tuple] = []
        self.handles = [
            model.register_forward_pre_hook(self._step, with_kwargs=True),
            model.model.norm.register_forward_hook(self._norm),
            model.lm_head.register_forward_pre_hook(self._lm),
        ]

    def _step(self, module, args, kwargs):
        reqs = self.manager.batch_processor.inputs_and_outputs.requests_in_batch
        cu = kwargs["cu_seq_lens_q"].tolist()
        self.poc_rows = set()
        chat = []
        for i, fs in enumerate(reqs):
            rid = fs.state.request_id
            if rid.startswith("cpoc-"):
                self.poc_rows.update(range(cu[i], cu[i + 1]))
            else:
                chat.append((rid, cu[i + 1] - cu[i]))
        if chat:
            self.chat_rows_per_step.append(tuple(chat))

    def _norm(self, module, args, output):
        self.final = output[0].detach().clone()

    def _lm(self, module, args):
        x = args[0][0]
        self.lm_rows += x.shape[0]
        for row in x:
            hits = (self.final == row).all(dim=-1).nonzero().flatten().tolist()
            if hits and all(h in self.poc_rows for h in hits):
                self.lm_poc_rows += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def count_rows_per_step(model, mgr):
    """A forward pre-hook recording (PoC rows, all rows) of every engine step, read from the batch itself."""
    per_step = []

    def count(module, args, kwargs):
        reqs = mgr.batch_processor.inputs_and_outputs.requests_in_batch
        cu = kwargs["cu_seq_lens_q"].tolist()
        poc = sum(cu[i + 1] - cu[i] for i, fs in enumerate(reqs) if fs.state.request_id.startswith("cpoc-"))
        per_step.append((poc, cu[len(reqs)]))

    return per_step, model.register_forward_pre_hook(count, with_kwargs=True)


def run_session(model, *, nonces=(), prompts=(), max_new=(), poc=True, mode="fill", late_chat=0,
                max_batch_tokens=MAX_BATCH_TOKENS, probe=False, on_artifact=None, wait_nonces=True, num_blocks=64,
                poc_options=None, on_forward=None):
    """One CB session: chat requests (all queued before start, the last ``late_chat`` after PoC started)
    and optionally continuous PoC over ``nonces`` (``poc_options``: more ``ContinuousPoC`` arguments).
    ``on_forward(manager, kwargs)`` is called before every engine forward. Returns a dict of what happened."""
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, page_size=16, max_requests_per_batch=16))
    cp = ContinuousPoC(model, mgr, mode=mode, on_artifact=on_artifact, **(poc_options or {})) if poc else None
    pr = Probe(model, mgr) if probe else None
    fwd = (model.register_forward_pre_hook(lambda m, a, k: on_forward(mgr, k), with_kwargs=True)
           if on_forward is not None else None)
    chat_ids, outputs = [], {}
    n_early = len(prompts) - late_chat
    try:
        for p, m in zip(prompts[:n_early], max_new[:n_early]):
            chat_ids.append(mgr.add_request(p, max_new_tokens=m))
        if cp is not None:
            cp.start(BH, PK, iter(list(nonces)), SEQ_LEN)
        mgr.start()
        if cp is not None and late_chat:
            cp.wait(nonces=1, timeout=TIMEOUT)
        for p, m in zip(prompts[n_early:], max_new[n_early:]):
            chat_ids.append(mgr.add_request(p, max_new_tokens=m))
        while len(outputs) < len(chat_ids):
            out = mgr.get_result(timeout=TIMEOUT)
            assert out is not None, "chat request not served"
            assert out.request_id in chat_ids, f"non-chat output {out.request_id!r} in the chat stream"
            assert out.error is None, out.error
            outputs[out.request_id] = list(out.generated_tokens)
        if cp is not None and wait_nonces and nonces:
            cp.wait(nonces=len(nonces), timeout=TIMEOUT)
        if cp is not None:
            cp.stop(drain=True, timeout=TIMEOUT)
        stray = mgr.get_result(timeout=0.05)
        assert stray is None, f"unexpected output {stray.request_id!r}"
    finally:
        mgr.stop(block=True, timeout=TIMEOUT)
        if cp is not None:
            cp.detach()
        if pr is not None:
            pr.remove()
        if fwd is not None:
            fwd.remove()
    return dict(chat=[outputs[i] for i in chat_ids], cp=cp, probe=pr,
                stats=None if cp is None else cp.stats(),
                artifacts=None if cp is None else {a.nonce: a.vector() for a in cp.collected},
                collected=None if cp is None else list(cp.collected))


def assert_equivalent(got: dict, ref: dict, collected) -> int:
    assert sorted(got) == sorted(ref), "every nonce yields exactly one artifact"
    assert len(collected) == len(got), "no duplicate artifacts"
    dist = {n: float(np.linalg.norm(got[n].astype(np.float64) - ref[n].astype(np.float64))) for n in ref}
    assert max(dist.values()) <= 1e-3, dist
    res = validate(collected, {n: v for n, v in ref.items()}, dist_threshold=0.2)
    assert res.n_mismatch == 0 and res.n_skipped == 0
    return sum(np.array_equal(got[n], ref[n]) for n in ref)


@pytest.mark.parametrize("n_chat, late", [(0, 0), (3, 0), (8, 4)], ids=["idle", "light", "heavy+late"])
def test_mixed_artifacts_equal_pure_poc(model, pure, n_chat, late):
    nonces = list(range(100, 112))
    prompts, max_new = chat_workload(seed=n_chat, n=n_chat)
    run = run_session(model, nonces=nonces, prompts=prompts, max_new=max_new, late_chat=late)
    st = run["stats"]
    assert not st["failed"], st["error"]
    assert st["nonces_done"] == len(nonces) and st["in_flight"] == 0
    assert st["nonces_split"] > 0, "chunked prefill must split some nonce over steps"
    if n_chat:
        assert st["chat_requests_done"] == n_chat
    identical = assert_equivalent(run["artifacts"], pure(nonces), run["collected"])
    print(f"\n{n_chat} chat requests: {identical}/{len(nonces)} artifacts bit-identical to pure PoC")


def test_chat_untouched_and_lm_head_never_sees_poc(model):
    nonces = list(range(7, 15))
    for seed in range(4):
        prompts, max_new = chat_workload(seed=1000 + seed, n=6)
        off = run_session(model, prompts=prompts, max_new=max_new, poc=False, probe=True)
        on = run_session(model, nonces=nonces, prompts=prompts, max_new=max_new, probe=True)
        assert on["chat"] == off["chat"], f"seed {seed}: chat tokens changed by PoC"
        # chat was scheduled exactly as without PoC (same chat rows in the same steps, in order)
        assert on["probe"].chat_rows_per_step == off["probe"].chat_rows_per_step
        assert on["stats"]["nonces_done"] == len(nonces) and on["stats"]["poc_tokens"] > 0
        assert on["probe"].lm_poc_rows == 0, "a PoC row reached the LM head"
        assert on["probe"].lm_rows > 0
        assert on["stats"]["poc_outputs_filtered"] == len(nonces)


def test_lm_head_probe_detects_leak(model, monkeypatch):
    """The probe above can fail: without the LM-head filter, PoC rows do reach the LM head."""
    monkeypatch.setattr(ForwardHooks, "_on_lm_head_in", lambda self, module, args: None)
    monkeypatch.setattr(ForwardHooks, "_on_lm_head_out", lambda self, module, args, output: None)
    run = run_session(model, nonces=[1, 2, 3], probe=True)
    assert run["probe"].lm_poc_rows > 0


def test_crash_in_poc_stops_poc_chat_continues(model, monkeypatch):
    prompts, max_new = chat_workload(seed=7, n=6)
    off = run_session(model, prompts=prompts, max_new=max_new, poc=False)
    calls = {"n": 0}
    real = continuous.hooks.reflect_rows_

    def flaky(hidden2d, rows, v):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected PoC fault")
        real(hidden2d, rows, v)

    monkeypatch.setattr(continuous.hooks, "reflect_rows_", flaky)  # where the layer hooks look it up
    on = run_session(model, nonces=list(range(50)), prompts=prompts, max_new=max_new, late_chat=3,
                     wait_nonces=False, probe=True)
    st = on["stats"]
    assert st["failed"] and "injected PoC fault" in st["error"]
    assert not st["running"] and st["in_flight"] == 0
    assert st["nonces_done"] < 50
    assert on["chat"] == off["chat"]
    assert on["probe"].lm_poc_rows == 0
    assert st["governor"]["stopped_reason"]


def test_governor_off_adds_no_poc_rows(model):
    prompts, max_new = chat_workload(seed=3, n=4)
    run = run_session(model, nonces=list(range(10)), prompts=prompts, max_new=max_new, mode="off",
                      wait_nonces=False, probe=True)
    st = run["stats"]
    assert st["poc_tokens"] == 0 and st["nonces_admitted"] == 0 and st["nonces_done"] == 0
    assert run["probe"].poc_rows == set() and st["chat_tokens"] > 0
    assert st["governor"]["decisions"]["off"] > 0


def test_artifact_stream_callback_iterator_and_stats(model, pure):
    nonces = [3, 1, 4, 15, 9, 2]
    seen = []
    run = run_session(model, nonces=nonces, on_artifact=seen.append)
    cp = run["cp"]
    assert [a.nonce for a in seen] == [a.nonce for a in run["collected"]]
    assert sorted(a.nonce for a in cp.artifacts(timeout=1)) == sorted(nonces)  # iterator ends after stop()
    st = run["stats"]
    assert st["nonces_per_s"] > 0 and 0 < st["poc_token_share"] <= 1
    assert st["poc_tokens"] == len(nonces) * SEQ_LEN
    assert st["cost"]["nonce_flops"] > 0
    assert cp.exchange_rate(100, 20) > 0
    assert_equivalent(run["artifacts"], pure(nonces), run["collected"])


def test_requires_no_block_sharing(model):
    from transformers import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(
        max_batch_tokens=32, num_blocks=16, page_size=16, allow_block_sharing=True, use_cuda_graph=False,
        use_async_batching=False, auto_switch_to_flash=False))
    with pytest.raises(ValueError, match="allow_block_sharing"):
        ContinuousPoC(model, mgr)


def test_chat_short_of_kv_preempts_poc_not_chat(model, pure):
    """A KV cache that holds only a few nonces: chat arriving while PoC holds the KV makes the glue preempt
    PoC nonces (re-queued and recomputed from scratch), chat outputs are unchanged and no nonce is lost."""
    nonces = list(range(200, 208))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 500, size=30).tolist() for _ in range(4)]
    max_new = [6] * 4
    off = run_session(model, prompts=prompts, max_new=max_new, poc=False, num_blocks=8)
    on = run_session(model, nonces=nonces, prompts=prompts, max_new=max_new, late_chat=4, num_blocks=8)
    st = on["stats"]
    assert not st["failed"], st["error"]
    assert st["nonces_preempted"] > 0 and st["poc_tokens_discarded"] > 0
    assert on["chat"] == off["chat"]
    assert_equivalent(on["artifacts"], pure(nonces), on["collected"])


def stepped_session(model, nonces, prompts, max_new, *, chat_after_first_nonce=False,
                    max_batch_tokens=MAX_BATCH_TOKENS, on_step=None, **poc_options):
    """Chat + continuous PoC on a fresh manager until everything is done. Returns (cp, per_step): the
    (PoC rows, all rows) of every engine step; ``on_step(cp)`` is also called at each step's start."""
    gen = GenerationConfig(max_new_tokens=max(max_new), do_sample=False, eos_token_id=-1, pad_token_id=0)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        max_batch_tokens=max_batch_tokens, num_blocks=64, page_size=16, max_requests_per_batch=16))
    cp = ContinuousPoC(model, mgr, **poc_options)
    per_step, handle = count_rows_per_step(model, mgr)
    extra = model.register_forward_pre_hook(lambda m, a, k: on_step(cp), with_kwargs=True) if on_step else None

    def add_chat():
        for p, m in zip(prompts, max_new):
            mgr.add_request(p, max_new_tokens=m)

    try:
        if not chat_after_first_nonce:
            add_chat()
        cp.start(BH, PK, iter(nonces), SEQ_LEN)
        mgr.start()
        if chat_after_first_nonce:  # PoC in flight, then chat arrives
            assert cp.wait(nonces=1, timeout=TIMEOUT)
            add_chat()
        for _ in prompts:
            assert mgr.get_result(timeout=TIMEOUT) is not None
        assert cp.wait(nonces=len(nonces), timeout=TIMEOUT)
        cp.stop()
    finally:
        mgr.stop(block=True, timeout=TIMEOUT)
        cp.detach()
        handle.remove()
        if extra is not None:
            extra.remove()
    return cp, per_step


def test_chat_only_steps_run_without_poc_hooks(model):
    """PoC's module hooks are armed only for steps with PoC rows: a chat-only step runs the engine's own code."""
    hooks = []  # PoC hooks present on (model, first layer, lm_head) at each step (2 model pre-hooks are the test's)
    prompts, max_new = chat_workload(seed=5, n=4)
    cp, per_step = stepped_session(
        model, range(900, 903), prompts, max_new, mode="fixed-share", governor_options={"fixed_share": 0.25},
        on_step=lambda cp: hooks.append((len(model._forward_pre_hooks) - 2, len(cp.layers[0]._forward_hooks),
                                         len(model.lm_head._forward_pre_hooks))))
    assert len(hooks) == len(per_step)
    kinds = {(poc > 0, n) for (poc, _), n in zip(per_step, hooks)}
    assert kinds == {(False, (0, 0, 0)), (True, (1, 1, 1))}, kinds  # both kinds of step happened
    assert not model._forward_pre_hooks and not cp.layers[0]._forward_hooks and not model.lm_head._forward_pre_hooks


def test_fixed_cost_keeps_poc_out_of_chat_steps_except_probes(model, pure, monkeypatch):
    """fill mode: when carrying PoC rows costs a chat step more than its SLO allowance, PoC joins only steps
    without chat, plus at most SMALL_POC_ROWS probe rows every PROBE_EVERY vetoed chat steps."""
    monkeypatch.setattr(PoCScheduler, "fixed_cost", lambda self: 1.0)  # 1 s per step: far above 5 % of a step
    monkeypatch.setattr(ContinuousPoC, "PROBE_EVERY", 3)
    nonces = list(range(500, 506))
    prompts, _ = chat_workload(seed=8, n=4)
    cp, per_step = stepped_session(model, nonces, prompts, [8] * len(prompts), chat_after_first_nonce=True)
    st = cp.stats()
    mixed = [poc for poc, total in per_step if 0 < poc < total]
    assert all(poc <= ContinuousPoC.SMALL_POC_ROWS for poc in mixed), mixed
    assert st["fixed_cost_vetoes"] >= 3 and 1 <= len(mixed) <= st["fixed_cost_probes"]
    assert st["fixed_cost_vetoes"] >= ContinuousPoC.PROBE_EVERY * st["fixed_cost_probes"]
    assert any(poc == total > 0 for poc, total in per_step)  # PoC-only steps
    assert_equivalent({a.nonce: a.vector() for a in cp.collected}, pure(nonces), cp.collected)


def test_fixed_share_budget_bounds_poc_rows_per_step(model, pure):
    """The glue adds no more PoC rows to a step than the governor allows (fixed-share: share × batch)."""
    nonces = list(range(300, 306))
    prompts, max_new = chat_workload(seed=21, n=5)
    cp, per_step = stepped_session(model, nonces, prompts, max_new, mode="fixed-share",
                                   governor_options={"fixed_share": 0.25})
    assert max(p for p, _ in per_step) == MAX_BATCH_TOKENS // 4  # floor(0.25 * 32) and actually reached
    assert sum(p for p, _ in per_step) == len(nonces) * SEQ_LEN
    assert_equivalent({a.nonce: a.vector() for a in cp.collected}, pure(nonces), cp.collected)


def test_idle_max_tokens_bounds_idle_steps_only(model, pure):
    """A large engine batch with ``idle_max_tokens``: steps without chat carry at most ``idle_max_tokens``
    PoC rows (and reach it), while chat still gets the engine's whole token budget; artifacts unchanged."""
    nonces = list(range(400, 408))
    big, idle = 96, SEQ_LEN  # the idle cap is one nonce's prefill; chat may use up to 96 tokens per step
    prompts = [[int(t) for t in np.random.default_rng(31 + i).integers(1, 500, size=30)] for i in range(3)]
    cp, per_step = stepped_session(model, nonces, prompts, [3] * len(prompts), max_batch_tokens=big,
                                   governor_options={"idle_max_tokens": idle})
    idle_steps = [p for p, total in per_step if p == total and p > 0]
    chat_rows = [total - p for p, total in per_step]
    assert idle_steps and max(idle_steps) == idle  # capped, and the cap is reached
    assert max(chat_rows) == len(prompts) * 30  # the chat prefill is one step: not bounded by the idle cap
    assert sum(p for p, _ in per_step) == len(nonces) * SEQ_LEN
    assert_equivalent({a.nonce: a.vector() for a in cp.collected}, pure(nonces), cp.collected)


def test_fresh_nonces_only_gives_the_rows_to_the_nonces_admitted_now(model, pure, monkeypatch):
    """The glue honours ``PoCBudget.fresh_nonces_only``: on a step with nonces pending where the governor (work
    model: the glue sets ``StepLoad.can_start_fresh``) answers it, the PoC rows the forward computes go only to
    the nonces admitted in that step, the pending ones wait; on the other steps PoC continues the pending nonces
    in the order ``StepLoad.poc_pending_computed`` lists them (oldest first); chat and artifacts are unchanged."""
    nonces = list(range(600, 610))
    prompts, max_new = chat_workload(seed=17, n=6)
    off = run_session(model, prompts=prompts, max_new=max_new, poc=False)

    holder, cur, records = {}, {}, []
    real_decide, real_admit, real_ensure = Governor.decide, PoCScheduler._admit, PoCScheduler._ensure_governor

    def ensure(self, cache):
        holder["sched"] = self
        return real_ensure(self, cache)

    def decide(self, load):
        budget = real_decide(self, load)
        assert load.can_start_fresh
        sh = holder["sched"].shared
        cur.clear()
        cur.update(load=load, forced=False, admitted=[], tokens=budget.tokens)
        eligible = load.poc_pending_computed and budget.tokens > 0 and len(sh.prepared) > 0
        if eligible:
            holder["eligible"] = holder.get("eligible", 0) + 1
            if holder["eligible"] % 2:  # every other such step: as the work model answers when continuing is dear
                budget = dataclasses.replace(budget, fresh_nonces_only=True, new_requests=max(1, budget.new_requests))
                cur.update(forced=True, tokens=budget.tokens)
        return budget

    def admit(self, sched, n):
        ids = real_admit(self, sched, n)
        cur.setdefault("admitted", []).extend(ids)
        return ids

    def on_forward(mgr, kwargs):
        reqs = mgr.batch_processor.inputs_and_outputs.requests_in_batch
        cu = kwargs["cu_seq_lens_q"].tolist()
        pos = kwargs["position_ids"].reshape(-1).tolist()
        poc = [(fs.state.request_id, pos[cu[i]], cu[i + 1] - cu[i]) for i, fs in enumerate(reqs)
               if fs.state.request_id.startswith("cpoc-")]
        if "load" in cur:
            records.append((dict(cur), poc))
        cur.clear()

    monkeypatch.setattr(Governor, "decide", decide)
    monkeypatch.setattr(PoCScheduler, "_admit", admit)
    monkeypatch.setattr(PoCScheduler, "_ensure_governor", ensure)
    on = run_session(model, nonces=nonces, prompts=prompts, max_new=max_new, mode="fixed-share",
                     poc_options={"governor_options": {"fixed_share": 0.25,
                                                       "model_shape": ModelShape.from_hf_config(model.config)}},
                     on_forward=on_forward)
    st = on["stats"]
    assert not st["failed"], st["error"]
    assert st["nonces_preempted"] == 0 and st["nonces_done"] == len(nonces)
    assert on["cp"].governor.config.model_shape is not None  # the work model
    forced = [(rec, poc) for rec, poc in records if rec["forced"]]
    assert any(rec["admitted"] and poc for rec, poc in forced), "no forced step carried fresh rows"
    assert st["fresh_only_steps"] >= 1
    for rec, poc in forced:
        admitted = set(rec["admitted"])
        assert {rid for rid, _, _ in poc} <= admitted, (rec, poc)  # the pending nonces got no row
        assert all(start == 0 for _, start, _ in poc)
        assert sum(n for _, _, n in poc) <= min(rec["tokens"], len(admitted) * SEQ_LEN)
    # the other steps continue the pending nonces in the order the load listed them, then start new ones
    continued = 0
    for rec, poc in records:
        if rec["forced"] or not poc:
            continue
        want = list(rec["load"].poc_pending_computed) + [0] * len(rec["admitted"])
        assert [start for _, start, _ in poc] == want[:len(poc)], (rec, poc)
        continued += sum(1 for _, start, _ in poc if start > 0)
    assert continued > 0
    assert on["chat"] == off["chat"], "chat tokens changed by PoC"
    assert_equivalent(on["artifacts"], pure(nonces), on["collected"])


def test_wait_without_a_count_returns_only_after_the_last_nonce(model, monkeypatch):
    """The iterator's end was flagged while the last nonces' inputs were still being made (not yet in
    ``prepared``): ``wait()`` then saw nothing in flight and returned before they were computed."""
    from cpoc_kernels.integrations.hf.continuous import worker

    real = worker.poc_input_embeddings

    def slow(*args, **kwargs):  # widen the window between drawing the nonces and queueing their inputs
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "poc_input_embeddings", slow)
    nonces = [11, 12, 13]
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        max_batch_tokens=MAX_BATCH_TOKENS, num_blocks=64, page_size=16, max_requests_per_batch=16))
    cp = ContinuousPoC(model, mgr)
    try:
        cp.start(BH, PK, iter(nonces), SEQ_LEN)
        mgr.start()
        assert cp.wait(timeout=TIMEOUT)
        assert cp.stats()["nonces_done"] == len(nonces)
        cp.stop(drain=True, timeout=TIMEOUT)
    finally:
        mgr.stop(block=True, timeout=TIMEOUT)
        cp.detach()
