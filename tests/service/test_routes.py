"""Every status code of the backend contract (mlnode_api.md §2, §11) over real HTTP on loopback, with a fake engine."""
import pytest

pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")

import asyncio  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
from service_support import FakeEngine, LoopbackServer, fake_vector, service_app  # noqa: E402

from cpoc_kernels.service.callbacks import CallbackConfig  # noqa: E402
from cpoc_kernels.service.service import ServiceConfig  # noqa: E402

POW = "/api/v1/pow"
FAST = ServiceConfig(callbacks=CallbackConfig(interval_s=0.2, backoff_initial_s=0.05, backoff_max_s=0.1,
                                              timeout_s=1.0, max_retries=2), max_queued_nonces=50)


def init_body(**over):
    body = {"block_hash": "h", "block_height": 100, "public_key": "ab", "node_id": 1, "node_count": 4,
            "batch_size": 8, "params": {"model": "org/model-b", "seq_len": 16, "k_dim": 12}, "url": None,
            "poc_stronger_rng": False, "group_id": 0, "n_groups": 1}
    body.update(over)
    return body


def gen_body(nonces=(3, 7, 11), **over):
    body = {"block_hash": "h", "block_height": 100, "public_key": "ab", "node_id": 0, "node_count": 1,
            "nonces": list(nonces), "params": {"model": "org/model-b", "seq_len": 16, "k_dim": 12}, "batch_size": 32,
            "wait": False, "url": None, "validation": None, "stat_test": None, "poc_stronger_rng": False}
    body.update(over)
    return body


@pytest.fixture
def backend():
    engine = FakeEngine()
    with LoopbackServer(service_app(engine, FAST)) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        client.engine = engine
        yield client


def test_idle_status_and_versions(backend):
    r = backend.get(f"{POW}/status")
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["config"], body["stats"]) == ("IDLE", None, None)
    assert {"delivered", "pending", "dropped"} <= {k.split("_")[-1] for k in body["cpoc"]["callbacks"]}
    v = backend.get(f"{POW}/versions").json()
    assert v["poc_validation_inference"] is True and v["engine"] == "fake"


@pytest.mark.parametrize("path", ["/init/generate", "/generate"])
def test_malformed_json_is_422(backend, path):
    r = backend.post(f"{POW}{path}", content=b'{"block_hash": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_json_without_content_type_is_parsed(backend):
    # DAPI's Go client sends no Content-Type (§8.1); FastAPI still parses the JSON body
    import json

    r = backend.post(f"{POW}/generate", content=json.dumps(gen_body(wait=True)).encode())
    assert r.status_code == 200, r.text


def test_unknown_params_key_is_422(backend):
    r = backend.post(f"{POW}/init/generate", json=init_body(params={"model": "org/model-b", "seq_len": 16, "route_window": 2}))
    assert r.status_code == 422
    r = backend.post(f"{POW}/generate", json=gen_body(params={"model": "org/model-b", "seq_len": 16, "decode": True}))
    assert r.status_code == 422
    assert backend.get(f"{POW}/status").json()["status"] == "IDLE"


def test_wrong_model_is_409(backend):
    for path, body in (("/init/generate", init_body()), ("/generate", gen_body())):
        body["params"]["model"] = "other/model"
        r = backend.post(f"{POW}{path}", json=body)
        assert r.status_code == 409
        detail = r.json()["detail"]
        assert detail["error"] == "params mismatch" and detail["requested"]["model"] == "other/model"
        assert "org/model-b" in detail["deployed"]["model"]


def test_init_double_init_stop_in_every_state(backend):
    stop = backend.post(f"{POW}/stop", json={})
    assert stop.status_code == 200 and stop.json()["status"] == "OK"  # idle
    r = backend.post(f"{POW}/init/generate", json=init_body())
    assert r.status_code == 200 and r.json() == {"status": "OK", "pow_status": {"status": "GENERATING"}}
    r2 = backend.post(f"{POW}/init/generate", json=init_body(block_hash="other"))
    assert r2.status_code == 409 and r2.json()["detail"] == "Already generating"
    time.sleep(0.2)
    st = backend.get(f"{POW}/status").json()
    assert st["status"] == "GENERATING" and st["config"]["block_hash"] == "h"  # the second init changed nothing
    assert set(st["config"]) == {"block_hash", "block_height", "public_key", "node_id", "node_count", "group_id",
                                 "n_groups", "seq_len", "k_dim"}
    assert st["stats"]["total_processed"] > 0 and st["stats"]["nonces_per_second"] > 0
    for _ in range(2):  # generating, then idle again: always 200
        r = backend.post(f"{POW}/stop", json={})
        assert r.status_code == 200 and r.json() == {"status": "OK", "pow_status": {"status": "STOPPED"}}
        assert backend.get(f"{POW}/status").json()["status"] == "IDLE"
    assert backend.post(f"{POW}/init/generate", json=init_body()).status_code == 200  # re-init after stop
    backend.post(f"{POW}/stop")


def test_mining_takes_the_partition_densely_in_order(backend):
    backend.post(f"{POW}/init/generate", json=init_body(node_id=1, node_count=4, group_id=1, n_groups=2))
    time.sleep(0.3)
    backend.post(f"{POW}/stop")
    taken = backend.engine.taken
    assert len(taken) >= 16
    # nonce_x = node_id + group_id*node_count + x*n_groups*node_count (§4), derived here from the formula
    assert taken == [1 + 1 * 4 + x * 2 * 4 for x in range(len(taken))]


def test_bad_partition_is_422_and_state_unchanged(backend):
    for over in (dict(node_id=4), dict(group_id=2, n_groups=2), dict(batch_size=0)):
        assert backend.post(f"{POW}/init/generate", json=init_body(**over)).status_code == 422
    r = backend.post(f"{POW}/init/generate", json=init_body(params={"model": "org/model-b", "seq_len": 16, "k_dim": 65}))
    assert r.status_code == 422 and "hidden" in r.json()["detail"]
    assert backend.get(f"{POW}/status").json()["status"] == "IDLE"


def test_generate_sync_artifacts(backend):
    r = backend.post(f"{POW}/generate", json=gen_body(wait=True))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "completed" and body["encoding"] == {"dtype": "f16", "k_dim": 12, "endian": "le"}
    assert [a["nonce"] for a in body["artifacts"]] == [3, 7, 11]
    assert body["artifacts"][0]["vector_b64"] == fake_vector("h", "ab", 3)


def test_generate_validation_nonce_mismatch_is_400(backend):
    arts = [{"nonce": n, "vector_b64": fake_vector("h", "ab", n)} for n in (3, 7)]
    r = backend.post(f"{POW}/generate", json=gen_body(validation={"artifacts": arts}))
    assert r.status_code == 400 and "must match" in r.json()["detail"]
    assert backend.post(f"{POW}/generate", json=gen_body(nonces=[3, 3])).status_code == 400


def test_generate_non_int32_nonce_is_422(backend):
    assert backend.post(f"{POW}/generate", json=gen_body(nonces=[1, 2**31])).status_code == 422
    assert backend.post(f"{POW}/generate", json=gen_body(nonces=[1, "x"])).status_code == 422


def test_queue_full_is_429_and_poll(backend):
    backend.engine.compute_delay = 0.3
    r = backend.post(f"{POW}/generate", json=gen_body(nonces=range(40)))
    assert r.status_code == 200
    first = r.json()
    assert first["status"] == "queued" and first["queued_count"] == 40
    # FAST allows 50 queued nonces: 40 + 40 is oversized while the first job still waits or runs
    r2 = backend.post(f"{POW}/generate", json=gen_body(nonces=range(40, 80)))
    assert r2.status_code in (200, 429)
    big = backend.post(f"{POW}/generate", json=gen_body(nonces=range(1000, 1051)))
    assert big.status_code == 429 and big.json()["detail"].startswith("Queue full")
    assert backend.get(f"{POW}/generate/not-a-job").status_code == 404
    deadline = time.monotonic() + 10
    while (st := backend.get(f"{POW}/generate/{first['request_id']}").json())["status"] != "completed":
        assert st["status"] in ("queued", "running") and time.monotonic() < deadline
        time.sleep(0.05)
    assert [a["nonce"] for a in st["artifacts"]] == list(range(40))


def test_jobs_wait_while_mining_and_stop_cancels_them(backend):
    backend.post(f"{POW}/init/generate", json=init_body())
    job = backend.post(f"{POW}/generate", json=gen_body()).json()
    time.sleep(0.3)
    assert backend.get(f"{POW}/generate/{job['request_id']}").json()["status"] == "queued"
    assert backend.engine.computed == []
    backend.post(f"{POW}/stop")
    assert backend.get(f"{POW}/generate/{job['request_id']}").status_code == 404  # /stop clears records
    assert backend.engine.computed == []
    assert backend.get(f"{POW}/status").json()["cpoc"]["jobs"]["cancelled"] == 1


def test_engine_failure_ends_the_round(backend):
    backend.post(f"{POW}/init/generate", json=init_body())
    backend.engine.fail_mining = "boom"
    deadline = time.monotonic() + 5
    while (st := backend.get(f"{POW}/status").json())["status"] != "IDLE":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "boom" in st["cpoc"]["mining_error"]
    backend.engine.fail_mining = None
    assert backend.post(f"{POW}/init/generate", json=init_body()).status_code == 200
    backend.post(f"{POW}/stop")


def test_no_engine_is_503():
    from fastapi import FastAPI

    from cpoc_kernels.service.routes import build_router

    app = FastAPI()
    app.include_router(build_router(lambda: None))
    with LoopbackServer(app) as srv, httpx.Client(base_url=srv.url) as client:
        for method, path, body in (("post", "/init/generate", init_body()), ("post", "/generate", gen_body()),
                                   ("get", "/status", None), ("post", "/stop", None)):
            r = getattr(client, method)(f"{POW}{path}", **({"json": body} if body else {}))
            assert r.status_code == 503 and r.json()["detail"] == "Engine not available"


def test_partition_ends_at_the_int32_bound(backend):
    # node_count 2**30: nonces 0, 2**30, then 2**31 is past int32 (the DAPI casts nonces to int32, §7.4)
    r = backend.post(f"{POW}/init/generate", json=init_body(node_id=0, node_count=2**30))
    assert r.status_code == 200
    time.sleep(0.3)
    assert backend.engine.taken == [0, 2**30]
    assert backend.get(f"{POW}/status").json()["stats"]["total_processed"] == 2
    backend.post(f"{POW}/stop")
    r = backend.post(f"{POW}/init/generate", json=init_body(node_id=2**31 - 1, node_count=2**31, group_id=1, n_groups=2))
    assert r.status_code == 422  # the partition's first nonce is already outside int32


def test_status_stays_idle_while_a_job_runs(backend):
    # the reference never reports VALIDATING (it would turn the proxy aggregate MIXED, §11.3)
    backend.engine.compute_delay = 0.5
    job = backend.post(f"{POW}/generate", json=gen_body()).json()
    time.sleep(0.2)
    assert backend.get(f"{POW}/generate/{job['request_id']}").json()["status"] == "running"
    st = backend.get(f"{POW}/status").json()
    assert st["status"] == "IDLE" and st["cpoc"]["jobs"]["running"] is True


def test_empty_validation_request(backend):
    r = backend.post(f"{POW}/generate", json=gen_body(nonces=[], wait=True, validation={"artifacts": []}))
    assert r.status_code == 200
    body = r.json()
    assert (body["n_total"], body["n_mismatch"], body["p_value"], body["fraud_detected"]) == (0, 0, 1.0, False)


def test_p_value_threshold_wins_over_fraud_threshold(backend):
    from fractions import Fraction
    from math import comb

    nonces = list(range(10))
    arts = [{"nonce": n, "vector_b64": fake_vector("h", "ab", n if n >= 3 else n + 100)} for n in nonces]  # 3 wrong
    p_value = float(sum(Fraction(comb(10, i)) * Fraction(1, 10) ** i * Fraction(9, 10) ** (10 - i) for i in range(3, 11)))
    assert 0.05 < p_value < 0.1  # 0.0702
    stat = {"dist_threshold": 0.4, "p_mismatch": 0.1, "fraud_threshold": 0.05}
    for extra, fraud in (({}, False), ({"p_value_threshold": 0.1}, True)):
        r = backend.post(f"{POW}/generate", json=gen_body(nonces=nonces, wait=True, validation={"artifacts": arts},
                                                          stat_test={**stat, **extra}))
        body = r.json()
        assert body["mismatch_nonces"] == [0, 1, 2] and body["p_value"] == pytest.approx(p_value, rel=1e-10)
        assert body["fraud_detected"] is fraud


class BatchedFake(FakeEngine):
    """The reference's batch loop (BatchedEngineAdapter) over the fake compute; every 3rd batch fails once."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    async def compute(self, round, nonces):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("injected engine hiccup")
        self.taken.extend(nonces)
        await asyncio.sleep(0.01)
        return await super().compute(round, nonces)


def _batched_engine():
    from cpoc_kernels.service.engine import BatchedEngineAdapter

    cls = type("BatchedFakeEngine", (BatchedEngineAdapter, BatchedFake), {"retry_seconds": 0.01})
    return cls()


def test_batched_adapter_mines_densely_and_retries_failed_batches():
    engine = _batched_engine()
    with LoopbackServer(service_app(engine, FAST)) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        assert client.post(f"{POW}/init/generate", json=init_body(batch_size=4)).status_code == 200
        time.sleep(0.4)
        assert client.post(f"{POW}/stop").status_code == 200
        st = client.get(f"{POW}/status").json()
        assert st["status"] == "IDLE" and st["cpoc"]["mining_error"] is None
    assert engine.calls >= 6
    # failed batches were retried with the same nonces: the computed ones are the partition's dense prefix
    assert engine.taken == [1 + x * 4 for x in range(len(engine.taken))]
    assert len(engine.taken) % 4 == 0
