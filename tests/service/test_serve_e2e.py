"""End to end through HTTP only: ``cpoc serve --model cpoc-tiny`` as subprocesses on loopback ports, a fake DAPI
on loopback receiving the callbacks (mlnode_api.md §11 scenario; issue 10 acceptance (a) and the fan-out).

Artifact equality with PoCRunner: the served path is HF continuous batching (paged flat batch), PoCRunner runs
plain [B, S, H] batches, so fp32 attention/matmul sums differ in the last bits; the stated tolerance is the one
of tests/integrations/hf/test_continuous.py: L2 distance of the decoded fp16 vectors <= 1e-3 (the network's
dist_threshold is 0.4), most of them bit-identical.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")

import base64  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from service_support import FakeDapi, free_socket  # noqa: E402

pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[2]
POW = "/api/v1/pow"
INTERVAL = 0.5  # POC_CALLBACK_INTERVAL_SEC for the backends
BH, PK, SEQ_LEN = "0xe2e-block-hash", "e2e-node-pubkey", 32
NODE_ID, NODE_COUNT = 1, 3
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 77], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


class Backend:
    def __init__(self, log_dir: pathlib.Path, name: str):
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   POC_CALLBACK_INTERVAL_SEC=str(INTERVAL), POC_CALLBACK_MAX_RETRIES="5")
        self.log = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cpoc_kernels.cli", "serve", "--model", "cpoc-tiny", "--host", "127.0.0.1",
             "--port", str(self.port), "--threads", "1", "--log-level", "warning", "--served-model-name", "org/model-b"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def wait_healthy(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, pathlib.Path(self.log.name).read_text()[-3000:]
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("backend did not become healthy")

    def close(self):
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("serve")
    pair = [Backend(log_dir, "a"), Backend(log_dir, "b")]
    try:
        for b in pair:
            b.wait_healthy()
        yield pair
    finally:
        for b in pair:
            b.close()


@pytest.fixture
def dapi():
    with FakeDapi(stage_height=100, node_ids=(0, NODE_ID)) as d:
        yield d


def greedy(backend, prompt, max_tokens=6):
    r = backend.http.post("/v1/completions", json={"model": "cpoc-tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == max_tokens
    return choice["token_ids"]


def init_body(url, **over):
    body = {"block_hash": BH, "block_height": 100, "public_key": PK, "node_id": NODE_ID, "node_count": NODE_COUNT,
            "batch_size": 32, "params": {"model": "org/model-b", "seq_len": SEQ_LEN, "k_dim": 12}, "url": url,
            "poc_stronger_rng": False, "group_id": 0, "n_groups": 1}
    body.update(over)
    return body


def wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.05)


def binom_sf_exact(k: int, n: int, p: Fraction) -> float:
    """P[X >= k], X ~ Binom(n, p), in exact rational arithmetic (independent of cpoc_kernels.validate)."""
    return float(sum(Fraction(math.comb(n, i)) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def pure_poc(nonces):
    from cpoc_kernels.integrations.hf.models import build_model
    from cpoc_kernels.integrations.hf.runner import PoCRunner

    runner = PoCRunner(build_model("cpoc-tiny"), BH, PK, SEQ_LEN, batch_size=32)
    return {a.nonce: a.vector() for a in runner.run(nonces)}


def decode(b64):
    return np.frombuffer(base64.b64decode(b64), dtype="<f2").astype(np.float64)


def test_serve_mines_beside_chat_and_validates(backends, dapi):
    be = backends[0]
    off = [greedy(be, p) for p in PROMPTS]  # PoC off
    assert be.http.get(f"{POW}/status").json()["status"] == "IDLE"
    versions = be.http.get(f"{POW}/versions").json()
    assert versions["poc_validation_inference"] is True

    r = be.http.post(f"{POW}/init/generate", json=init_body(dapi.base_url))
    assert r.status_code == 200 and r.json()["status"] == "OK"
    # while mining: chat keeps succeeding with the same greedy tokens; /health and /status answer quickly
    health_s = []
    for _ in range(3):
        assert [greedy(be, p) for p in PROMPTS] == off
        sampled = be.http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0.8})
        assert sampled.status_code == 200 and len(sampled.json()["choices"][0]["token_ids"]) == 4
        for path in ("/health", f"{POW}/status"):
            t0 = time.perf_counter()
            assert be.http.get(path).status_code == 200
            health_s.append(time.perf_counter() - t0)
    assert max(health_s) < 2.0, health_s  # the proxy's probe and status-poll timeout (§11.2, §11.3)
    wait_for(lambda: len(dapi.stored) >= 64, what="64 delivered artifacts")
    st = be.http.get(f"{POW}/status").json()
    assert st["status"] == "GENERATING" and st["stats"]["nonces_per_second"] > 0
    assert st["config"]["node_id"] == NODE_ID and st["cpoc"]["poc_token_share"] > 0
    assert st["cpoc"]["callbacks"]["artifacts_delivered"] >= 64

    assert be.http.post(f"{POW}/stop").status_code == 200
    t_stop = time.monotonic()
    wait_for(lambda: be.http.get(f"{POW}/status").json()["cpoc"]["callbacks"]["artifacts_pending"] == 0, 15,
             "final flush")
    time.sleep(2 * INTERVAL)
    posts = dapi.posts_to("/generated")
    assert posts and max(p["t"] for p in posts) <= t_stop + INTERVAL, "callbacks went on after /stop"
    assert all(p["status"] == 200 for p in posts) and dapi.duplicates == 0
    st = be.http.get(f"{POW}/status").json()
    assert st["status"] == "IDLE" and st["cpoc"]["callbacks"]["artifacts_dropped"] == 0

    # the delivered nonces are the partition's first ones, dense (nonce_x = node_id + x*node_count, §4)
    delivered = sorted(dapi.stored)
    assert delivered == [NODE_ID + x * NODE_COUNT for x in range(len(delivered))]
    # artifacts equal PoCRunner's on the same nonces (tolerance: module docstring)
    sample = delivered[:32] + delivered[-16:]
    ref = pure_poc(sample)
    dist = {n: float(np.linalg.norm(decode(dapi.stored[n]) - ref[n].astype(np.float64))) for n in sample}
    assert max(dist.values()) <= 1e-3, dist
    assert sum(d == 0.0 for d in dist.values()) >= len(sample) // 2

    # validation /generate with tampered vectors: exact mismatch set and exact binomial p-value
    nonces = delivered[:20]
    vectors = {n: dapi.stored[n] for n in nonces}
    flipped = [nonces[3], nonces[11]]
    for n in flipped:
        vectors[n] = base64.b64encode((-decode(vectors[n])).astype("<f2").tobytes()).decode()  # distance 2
    garbage = nonces[17]
    vectors[garbage] = "AAAA"  # 3 bytes: not k_dim x fp16
    body = {"block_hash": BH, "block_height": 100, "public_key": PK, "node_id": 0, "node_count": 2, "nonces": nonces,
            "params": {"model": "org/model-b", "seq_len": SEQ_LEN, "k_dim": 12}, "batch_size": 32, "wait": True,
            "url": None, "validation": {"artifacts": [{"nonce": n, "vector_b64": v} for n, v in vectors.items()]},
            "stat_test": {"dist_threshold": 0.4, "p_mismatch": 0.1, "fraud_threshold": 0.01}, "poc_stronger_rng": False}
    # chat keeps being served beside the validation recompute, with unchanged greedy tokens
    chat_runs, stop_chat = [], threading.Event()

    def chat_loop():
        with httpx.Client(base_url=be.url, timeout=30) as client:
            while not stop_chat.is_set():
                r = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0})
                chat_runs.append((r.status_code, r.json()["choices"][0]["token_ids"] if r.status_code == 200 else None))

    chat = threading.Thread(target=chat_loop)
    chat.start()
    wait_for(lambda: len(chat_runs) >= 1, 30, "chat running")
    before = len(chat_runs)
    r = be.http.post(f"{POW}/generate", json=body)
    stop_chat.set()
    chat.join(30)
    assert len(chat_runs) > before  # a chat request was in flight while the validation was submitted and ran
    assert all(code == 200 and tokens == off[2] for code, tokens in chat_runs)
    assert r.status_code == 200, r.text
    res = r.json()
    expected = sorted(flipped + [garbage])
    assert res["status"] == "completed" and res["n_total"] == 20
    assert res["mismatch_nonces"] == expected and res["n_mismatch"] == 3
    p_exact = binom_sf_exact(3, 20, Fraction(1, 10))
    assert res["p_value"] == pytest.approx(p_exact, rel=1e-10)
    assert res["fraud_detected"] is (p_exact < 0.01)

    # the same job queued (wait=false): one /validated callback with the same verdict
    dapi.phase = "validate"
    body.update(wait=False, url=dapi.base_url)
    r = be.http.post(f"{POW}/generate", json=body)
    assert r.status_code == 200 and r.json()["status"] == "queued"
    wait_for(lambda: len(dapi.validated) == 1, 30, "/validated callback")
    v = dapi.validated[0]
    assert v["request_id"] == r.json()["request_id"] and v["mismatch_nonces"] == expected
    assert v["p_value"] == pytest.approx(p_exact, rel=1e-10) and (v["block_height"], v["public_key"]) == (100, PK)


def test_two_backends_fan_out_disjoint(backends, dapi):
    """A proxy-like fan-out (KG pow_v2_routes.py: same body, group_id = index among healthy backends sorted by
    port, n_groups = their count): the two backends mine disjoint nonce sets."""
    ordered = sorted(backends, key=lambda b: b.port)
    for i, be in enumerate(ordered):
        r = be.http.post(f"{POW}/init/generate", json=init_body(dapi.base_url, group_id=i, n_groups=len(ordered)))
        assert r.status_code == 200
    step = len(ordered) * NODE_COUNT
    groups = [{NODE_ID + g * NODE_COUNT + x * step for x in range(100000)} for g in range(len(ordered))]
    wait_for(lambda: all(len(set(dapi.stored) & g) >= 16 for g in groups), 60, "both backends delivering")
    for be in ordered:
        assert be.http.post(f"{POW}/stop").status_code == 200
    for be in ordered:
        wait_for(lambda be=be: be.http.get(f"{POW}/status").json()["cpoc"]["callbacks"]["artifacts_pending"] == 0, 15)
    posted = [a["nonce"] for p in dapi.posts_to("/generated") if p["status"] == 200 for a in p["body"]["artifacts"]]
    assert len(posted) == len(set(posted)) and dapi.duplicates == 0  # no nonce mined by both
    assert set(posted) <= groups[0] | groups[1]
    for g, group in enumerate(groups):  # each backend: a dense prefix of its own partition
        mine = sorted(set(posted) & group)
        assert mine == [NODE_ID + g * NODE_COUNT + x * step for x in range(len(mine))]


def test_completions_route(backends):
    be = backends[1]
    post = lambda body: be.http.post("/v1/completions", json=body)  # noqa: E731
    r = post({"model": "org/model-b", "prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["token_ids"] == greedy(be, PROMPTS[0], 4)
    r = post({"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0.9, "top_p": 0.9, "top_k": 20, "n": 2})
    assert r.status_code == 200 and [len(c["token_ids"]) for c in r.json()["choices"]] == [5, 5]
    assert all(0 <= t < 512 for c in r.json()["choices"] for t in c["token_ids"])
    for bad, status in (({"model": "nope", "prompt": [1]}, 404), ({"prompt": "hello"}, 400),
                        ({"prompt": [1, 512]}, 400), ({"prompt": []}, 400), ({"prompt": [1], "max_tokens": 0}, 400),
                        ({"prompt": [1], "max_tokens": 10**6}, 400), ({"prompt": [1], "temperature": -1}, 400)):
        r = post(bad)
        assert r.status_code == status, (bad, r.text)
        assert r.json()["error"]["message"]
    assert {m["id"] for m in be.http.get("/v1/models").json()["data"]} == {"cpoc-tiny", "org/model-b"}
