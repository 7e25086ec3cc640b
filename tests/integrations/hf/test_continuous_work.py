"""Continuous PoC reports each step's work to the governor (CPU, fp32, cpoc-tiny).

The governor's step-time model reads, per step, the attention pairs, KV entries read and LM-head rows: in the
:class:`StepLoad` (the chat rows scheduled before PoC joins) and in ``observe`` (the whole step). The figures the
glue passes are checked against values recomputed here from what each forward actually ran (its requests'
``position_ids`` / ``cu_seq_lens_q`` and the prompts' lengths); and the governor's step-time model is the rows
model on CPU, the work model when the glue has the model's shape, a user's ``step_time_model`` always.
"""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import GenerationConfig  # noqa: E402

from cpoc_kernels.cost import ModelShape  # noqa: E402
from cpoc_kernels.governor import Governor  # noqa: E402
from cpoc_kernels.integrations.hf.continuous import ContinuousPoC, cb_config  # noqa: E402
from cpoc_kernels.integrations.hf.models import build_model  # noqa: E402
from cpoc_kernels.step_model import RooflineStepTimeModel, WorkStepTimeModel  # noqa: E402

BH, PK = "0x7c1e-continuous-work-block", "cpoc-test-node-pubkey"
SEQ_LEN = 40
MAX_BATCH_TOKENS = 32  # < SEQ_LEN and < the longest prompt: nonces and some prompts are prefilled in chunks
TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("cpoc-tiny", dtype=torch.float32)


def manager(model, max_new: int):
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    return model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        max_batch_tokens=MAX_BATCH_TOKENS, num_blocks=64, page_size=16, max_requests_per_batch=16))


def test_step_load_and_observe_report_the_steps_work(model, monkeypatch):
    decided, observed, steps = [], [], []
    real_decide, real_observe = Governor.decide, Governor.observe

    def decide(self, load):
        decided.append((len(steps), load))
        return real_decide(self, load)

    def observe(self, total_tokens, poc_tokens, step_seconds, attention_keys=0, kv_tokens_read=0, lm_rows=0):
        observed.append((total_tokens, poc_tokens, attention_keys, kv_tokens_read, lm_rows))
        return real_observe(self, total_tokens, poc_tokens, step_seconds, attention_keys, kv_tokens_read, lm_rows)

    monkeypatch.setattr(Governor, "decide", decide)
    monkeypatch.setattr(Governor, "observe", observe)

    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 500, size=int(size)).tolist() for size in (5, 12, 45, 20)]  # 45: two chunks
    nonces = list(range(700, 706))
    mgr = manager(model, max_new=6)
    # the work model reads the figures (a rows model does not, and the glue then skips them: see below)
    shape = ModelShape.from_hf_config(model.config)
    cp = ContinuousPoC(model, mgr, mode="fixed-share", governor_options={"fixed_share": 0.25, "model_shape": shape},
                       observe_interval=0.0)  # observe every step
    prompt_len = {}

    def record(module, args, kwargs):
        reqs = mgr.batch_processor.inputs_and_outputs.requests_in_batch
        cu = kwargs["cu_seq_lens_q"].tolist()
        pos = kwargs["position_ids"].reshape(-1).tolist()
        chat, poc = [0, 0, 0, 0], [0, 0, 0]  # chat: rows, keys, KV read, LM rows; PoC: rows, keys, KV read
        for i, fs in enumerate(reqs):
            rid = fs.state.request_id
            rows = pos[cu[i]:cu[i + 1]]
            n, s = len(rows), rows[0]
            assert rows == list(range(s, s + n))
            keys = sum(p + 1 for p in rows)  # causal: the row at position p attends over p + 1 keys
            if rid.startswith("cpoc-"):
                poc = [poc[0] + n, poc[1] + keys, poc[2] + s + n]
            else:
                lm = int(s + n >= prompt_len[rid])  # its last prompt token or a decode row: it samples
                chat = [chat[0] + n, chat[1] + keys, chat[2] + s + n, chat[3] + lm]
        steps.append((tuple(chat), (chat[0] + poc[0], poc[0], chat[1] + poc[1], chat[2] + poc[2], chat[3])))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for p in prompts:
            prompt_len[mgr.add_request(p, max_new_tokens=6)] = len(p)
        cp.start(BH, PK, iter(nonces), SEQ_LEN)
        mgr.start()
        for _ in prompts:
            out = mgr.get_result(timeout=TIMEOUT)
            assert out is not None and out.error is None
        assert cp.wait(nonces=len(nonces), timeout=TIMEOUT)
        cp.stop()
    finally:
        mgr.stop(block=True, timeout=TIMEOUT)
        cp.detach()
        handle.remove()

    st = cp.stats()
    assert not st["failed"], st["error"]
    assert st["nonces_preempted"] == 0  # the chat a load describes is then the chat its step ran
    assert isinstance(cp.governor.model, WorkStepTimeModel) and cp.governor.reads_step_work

    # StepLoad: every decision made for a step describes the chat rows that step ran
    assert decided
    for k, load in decided:
        chat_rows, keys, kv, lm = steps[k][0]
        assert (load.chat_tokens, load.chat_attention_keys, load.chat_kv_tokens_read, load.chat_lm_rows) == (
            chat_rows, keys, kv, lm), (k, load)
    loads = [load for _, load in decided]
    assert any(load.chat_prefill_tokens and load.chat_lm_rows < len(prompts) for load in loads)
    assert any(load.chat_decode_requests and load.chat_lm_rows == load.chat_decode_requests for load in loads)
    assert any(load.chat_tokens == 0 for load in loads)  # idle steps too

    # observe: each observed step is one the engine ran, with its whole-step figures
    want = Counter(total for _, total in steps)
    got = Counter(observed)
    assert not got - want, (got - want, want)
    poc_steps = sum(1 for _, total in steps if total[1])
    assert sum(got.values()) >= poc_steps - 2  # nearly every step (the last ones may still be queued at stop)
    assert any(0 < poc < total and lm > 0 for total, poc, _, _, lm in observed)  # mixed steps
    assert any(poc == total and lm == 0 for total, poc, _, _, lm in observed)  # PoC-only steps: no LM head


class _FakeCache(SimpleNamespace):
    def compute_free_capacity(self, relative=True):
        return 1.0


@pytest.mark.parametrize("case", ["cpu", "shape", "user-model", "user-shape"])
def test_governor_step_time_model_choice(model, case):
    """The glue gives the governor the model's shape only on CUDA (here: set by hand); a user's ``step_time_model``
    or ``model_shape`` option wins."""
    mgr = manager(model, max_new=2)
    user = RooflineStepTimeModel()
    options = {"model_shape": None} if case == "user-shape" else {}
    cp = ContinuousPoC(model, mgr, step_time_model=user if case == "user-model" else None,
                       governor_options=options)
    try:
        assert cp._scheduler.model_shape is None  # a CPU model: no shape
        if case != "cpu":
            cp._scheduler.model_shape = ModelShape.from_hf_config(model.config)  # as on a CUDA device
        cp.start(BH, PK, iter(()), SEQ_LEN)
        governor = cp._scheduler._ensure_governor(_FakeCache(max_tokens_read=1024, max_batch_tokens=MAX_BATCH_TOKENS))
        cp.stop(drain=False)
    finally:
        cp.detach()
    if case == "shape":
        assert isinstance(governor.model, WorkStepTimeModel)
        assert governor.config.model_shape == ModelShape.from_hf_config(model.config)
    elif case == "user-model":
        assert governor.model is user
    else:
        assert isinstance(governor.model, RooflineStepTimeModel) and governor.config.model_shape is None
