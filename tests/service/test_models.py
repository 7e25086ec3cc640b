"""The request models against the network's field names, types and defaults (mlnode_api.md §1 A1/A2, §2 B1/B2,
§8.2; GV20 vllm/poc/routes.py PoCInitGenerateRequest/PoCGenerateRequest/StatTestModel, KG pow_v2_routes.py)."""
import pytest

pytest.importorskip("pydantic", reason="needs the 'serve' extra")

from pydantic import ValidationError  # noqa: E402

from cpoc_kernels.service import models as M  # noqa: E402

REQUIRED = object()

# field: (python type name accepted by the network, default or REQUIRED) — from the spec tables
INIT_FIELDS = {
    "block_hash": ("str", REQUIRED), "block_height": ("int", REQUIRED), "public_key": ("str", REQUIRED),
    "node_id": ("int", REQUIRED), "node_count": ("int", REQUIRED), "group_id": ("int", 0), "n_groups": ("int", 1),
    "batch_size": ("int", 32), "params": ("params", REQUIRED), "url": ("str|null", None),
    "poc_stronger_rng": ("bool", False),
}
GENERATE_FIELDS = {
    "block_hash": ("str", REQUIRED), "block_height": ("int", REQUIRED), "public_key": ("str", REQUIRED),
    "node_id": ("int", REQUIRED), "node_count": ("int", REQUIRED), "nonces": ("list[int]", REQUIRED),
    "params": ("params", REQUIRED), "batch_size": ("int", 32), "wait": ("bool", False), "url": ("str|null", None),
    "validation": ("validation|null", None), "stat_test": ("stat_test|null", None), "poc_stronger_rng": ("bool", False),
}
PARAMS_FIELDS = {"model": ("str", REQUIRED), "seq_len": ("int", REQUIRED), "k_dim": ("int", 12)}
STAT_FIELDS = {"dist_threshold": 0.02, "p_mismatch": 0.001, "fraud_threshold": 0.01}


def _check_fields(model, table):
    fields = model.model_fields
    for name, (_, default) in table.items():
        assert name in fields, name
        if default is REQUIRED:
            assert fields[name].is_required(), name
        else:
            assert not fields[name].is_required() and fields[name].default == default, name


def test_field_names_and_defaults():
    _check_fields(M.InitGenerateRequest, INIT_FIELDS)
    _check_fields(M.GenerateRequest, GENERATE_FIELDS)
    _check_fields(M.PoCParams, PARAMS_FIELDS)
    for name, default in STAT_FIELDS.items():
        assert M.StatTest.model_fields[name].default == default
    # nothing beyond the network's fields is required
    for model, table in ((M.InitGenerateRequest, INIT_FIELDS), (M.GenerateRequest, GENERATE_FIELDS)):
        assert {n for n, f in model.model_fields.items() if f.is_required()} == \
               {n for n, (_, d) in table.items() if d is REQUIRED}


def proxy_init_body(**over):
    """What KG's MLNode proxy sends: model_dump() of its model (every field, defaults and nulls) + group fields."""
    body = {"block_hash": "h", "block_height": 100, "public_key": "ab", "node_id": 1, "node_count": 4,
            "batch_size": 32, "params": {"model": "org/model-b", "seq_len": 16, "k_dim": 12}, "url": None,
            "poc_stronger_rng": False, "group_id": 0, "n_groups": 1}
    body.update(over)
    return body


def test_proxy_dump_parses_and_extra_top_level_is_ignored():
    req = M.InitGenerateRequest.model_validate(proxy_init_body(something_new=1))
    assert (req.node_id, req.node_count, req.batch_size, req.params.k_dim, req.url) == (1, 4, 32, 12, None)
    minimal = {k: v for k, v in proxy_init_body().items() if INIT_FIELDS[k][1] is REQUIRED}
    minimal["params"] = {"model": "m", "seq_len": 8}
    req = M.InitGenerateRequest.model_validate(minimal)
    assert (req.group_id, req.n_groups, req.batch_size, req.params.k_dim, req.poc_stronger_rng) == (0, 1, 32, 12, False)


def test_unknown_params_key_rejected():
    with pytest.raises(ValidationError, match="extra"):
        M.InitGenerateRequest.model_validate(proxy_init_body(params={"model": "m", "seq_len": 8, "decode": True}))


def test_lax_integers_as_the_network():
    # pydantic's default (lax) mode, as the reference: "7" and 7.0 are ints, 7.5 is not
    assert M.InitGenerateRequest.model_validate(proxy_init_body(node_id="1")).node_id == 1
    with pytest.raises(ValidationError):
        M.InitGenerateRequest.model_validate(proxy_init_body(node_id=1.5))


@pytest.mark.parametrize("over", [dict(node_id=4), dict(node_id=-1), dict(group_id=1), dict(n_groups=0),
                                  dict(node_count=0), dict(batch_size=0),
                                  dict(params={"model": "m", "seq_len": 0}),
                                  dict(params={"model": "m", "seq_len": 8, "k_dim": 0})])
def test_bad_partition_or_shape_rejected(over):
    with pytest.raises(ValidationError):
        M.InitGenerateRequest.model_validate(proxy_init_body(**over))


def gen_body(**over):
    body = {"block_hash": "h", "block_height": 100, "public_key": "ab", "node_id": 0, "node_count": 1,
            "nonces": [1, 2], "params": {"model": "m", "seq_len": 8}}
    body.update(over)
    return body


@pytest.mark.parametrize("nonce", [2**31, -(2**31) - 1, 2**40])
def test_non_int32_nonce_rejected(nonce):
    with pytest.raises(ValidationError):
        M.GenerateRequest.model_validate(gen_body(nonces=[1, nonce]))
    with pytest.raises(ValidationError):
        M.GenerateRequest.model_validate(gen_body(validation={"artifacts": [{"nonce": nonce, "vector_b64": "x"}]}))


def test_int32_bounds_accepted():
    assert M.GenerateRequest.model_validate(gen_body(nonces=[2**31 - 1, -(2**31)])).nonces == [2**31 - 1, -(2**31)]


def test_stat_test_names():
    # the chain's name (p_value_threshold) wins when present; unknown keys are ignored as in the reference
    st = M.StatTest.model_validate({"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05,
                                    "fraud_threshold": 0.01, "unknown": 3})
    assert st.effective_fraud_threshold == 0.05
    assert M.StatTest.model_validate({"fraud_threshold": 0.2}).effective_fraud_threshold == 0.2
    assert M.StatTest().effective_fraud_threshold == 0.01
    with pytest.raises(ValidationError):
        M.StatTest.model_validate({"p_mismatch": 0})


def test_env_knobs_keep_the_network_names():
    from cpoc_kernels.service.callbacks import CallbackConfig
    from cpoc_kernels.service.service import ServiceConfig

    env = {"POC_CALLBACK_INTERVAL_SEC": "2.5", "POC_CALLBACK_MAX_RETRIES": "3", "POC_CALLBACK_MAX_ARTIFACTS": "7",
           "POC_CALLBACK_MAX_CONCURRENT": "2", "POC_CALLBACK_QUEUE_SIZE": "9", "POC_MAX_QUEUED_NONCES": "11",
           "POC_GENERATE_RESULT_TTL_SEC": "12"}
    cfg = ServiceConfig.from_env(env)
    cb = cfg.callbacks
    assert (cb.interval_s, cb.max_retries, cb.max_buffered_artifacts, cb.max_concurrent_results,
            cb.max_queued_results) == (2.5, 3, 7, 2, 9)
    assert (cfg.max_queued_nonces, cfg.result_ttl_s) == (11, 12.0)
    default = ServiceConfig.from_env({})  # the reference's defaults (mlnode_api.md §2, §7.2)
    assert (default.callbacks.interval_s, default.callbacks.max_retries, default.callbacks.max_buffered_artifacts,
            default.callbacks.timeout_s, default.max_queued_nonces, default.result_ttl_s) == (5.0, 10, 1_000_000, 10.0,
                                                                                           100_000, 300.0)
    assert [default.callbacks.backoff(i) for i in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError, match="POC_CALLBACK_MAX_RETRIES"):
        CallbackConfig.from_env({"POC_CALLBACK_MAX_RETRIES": "many"})
    with pytest.raises(ValueError):
        CallbackConfig.from_env({"POC_CALLBACK_INTERVAL_SEC": "0"})
