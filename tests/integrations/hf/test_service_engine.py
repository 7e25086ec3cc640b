"""The HF engine adapter of the PoC service (in process): recomputes equal PoCRunner's within the CB path's
tolerance (L2 <= 1e-3, see tests/integrations/hf/test_continuous.py), a cancelled recompute leaves the engine
usable, round checks refuse what the engine cannot compute, chat is served between PoC rounds."""
import asyncio

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from cpoc_kernels.integrations.hf.models import build_model  # noqa: E402
from cpoc_kernels.integrations.hf.runner import PoCRunner  # noqa: E402
from cpoc_kernels.integrations.hf.service_engine import CompletionError, EngineSettings, HFEngine  # noqa: E402
from cpoc_kernels.service.engine import RoundSpec  # noqa: E402

ROUND = RoundSpec("0xadapter-block", "adapter-pubkey", seq_len=24)


@pytest.fixture(scope="module")
def engine():
    model = build_model("cpoc-tiny", dtype=torch.float32)
    eng = HFEngine(model, ["cpoc-tiny"], EngineSettings(max_batch_tokens=64, num_blocks=64))
    eng.start()
    yield eng
    eng.close()


def test_compute_matches_pure_poc_and_survives_cancel(engine):
    nonces = [9, 2, 40, 7, 11, 3]

    async def run():
        first = await engine.compute(ROUND, nonces)
        task = asyncio.ensure_future(engine.compute(ROUND, list(range(100, 400))))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await engine.compute(ROUND, nonces[:3])
        chat = await engine.complete([1, 2, 3], 3, temperature=0)
        return first, again, chat

    first, again, chat = asyncio.run(run())
    assert [a.nonce for a in first] == nonces and [a.nonce for a in again] == nonces[:3]
    ref = {a.nonce: a.vector() for a in PoCRunner(engine.model, ROUND.block_hash, ROUND.public_key, ROUND.seq_len).run(nonces)}
    assert max(float(np.linalg.norm(a.vector() - ref[a.nonce])) for a in first) <= 1e-3
    assert [a.vector_b64 for a in again] == [a.vector_b64 for a in first[:3]]
    assert len(chat.token_ids) == 3


def test_round_and_completion_checks(engine):
    with pytest.raises(ValueError, match="hidden"):
        engine.check_round(RoundSpec("b", "p", seq_len=8, k_dim=65))
    with pytest.raises(ValueError, match="KV capacity"):
        engine.check_round(RoundSpec("b", "p", seq_len=64 * 16 + 1))
    engine.check_round(RoundSpec("b", "p", seq_len=8, k_dim=12))
    for prompt, n in (([], 1), ([512], 1), ([True], 1), ([1], 0), ([1] * 1000, 100)):
        with pytest.raises(CompletionError):
            engine.check_completion(prompt, n)


def test_many_short_computes_each_return_every_nonce(engine):
    # a short recompute must not end before its last nonces' inputs are prepared (ContinuousPoC.wait() without a
    # count can: the iterator is exhausted before the inputs reach the admission queue)
    async def run():
        return [await engine.compute(ROUND, [n, n + 1]) for n in range(500, 520, 2)]

    for i, arts in enumerate(asyncio.run(run())):
        assert [a.nonce for a in arts] == [500 + 2 * i, 501 + 2 * i]
