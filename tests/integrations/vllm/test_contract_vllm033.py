"""Contract: every vLLM symbol the cpoc plugin touches, pinned on the installed vLLM 0.33 (import, attribute,
signature, and the source facts the seams rely on). Run in the vLLM 0.33 venv: .ci/vllm_contract.sh."""
import dataclasses
import inspect
import os
import subprocess
import sys
import typing

import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import cpoc_kernels.integrations.vllm as plugin  # noqa: E402
from cpoc_kernels.integrations.vllm import seams  # noqa: E402
from cpoc_kernels.integrations.vllm.requests import PoCRound, poc_request  # noqa: E402


def params(fn):
    return list(inspect.signature(fn).parameters)


def source(obj):
    return inspect.getsource(obj)


def field_names(cls):
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "__annotations__", {})) | set(getattr(cls, "__struct_fields__", ()))


def test_version_is_supported():
    assert vllm.__version__.startswith("0.33.")
    assert plugin.check_vllm_version(vllm.__version__) == "0.33"


# ------------------------------------------------------------------------------------------ plugin surfaces
def test_plugin_groups_and_loader():
    import vllm.plugins as plugins

    assert plugins.DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
    assert "func()" in source(plugins.load_general_plugins)  # calls every registered function, no arguments


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("cpoc") == "cpoc_kernels.integrations.vllm:register"


def test_endpoint_plugin_surface():
    """The PoC routes ride vLLM's public endpoint-plugin group: loaded only when VLLM_PLUGINS names them, routes
    attached in build_app (before the engine), state initialised in init_app_state (with the engine client)."""
    import vllm.plugins as plugins
    from vllm.entrypoints.launchers import app as launcher_app
    from vllm.entrypoints.launchers.api_server import app_state
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin, attach_endpoint_plugins

    from cpoc_kernels.integrations.vllm.serve import CpocEndpointPlugin

    assert plugins.ENDPOINT_PLUGINS_GROUP == "vllm.endpoint_plugins"
    assert "envs.VLLM_PLUGINS is None" in source(plugins.load_endpoint_plugins)  # opt-in by name only
    assert params(EndpointPlugin.attach_router) == ["self", "app"]
    assert params(EndpointPlugin.init_state) == ["self", "engine_client", "state", "args"]
    assert isinstance(CpocEndpointPlugin(), EndpointPlugin)
    assert "attach_endpoint_plugins(app, supported_tasks)" in source(launcher_app.build_app)
    assert "init_endpoint_plugins_state(engine_client, state, args)" in source(app_state.init_app_state)
    assert "args.served_model_name" in source(app_state.init_app_state)  # what served_model_names() mirrors
    assert params(attach_endpoint_plugins) == ["app", "supported_tasks"]


def test_endpoint_plugin_attaches_the_pow_routes(monkeypatch):
    """Through vLLM's own attach step and exception handlers: the routes exist, and their errors keep the
    contract's FastAPI shapes (``{"detail": …}``, 422) instead of vLLM's OpenAI error bodies (400)."""
    import asyncio
    from importlib.metadata import entry_points
    from types import SimpleNamespace

    import httpx
    from fastapi import FastAPI
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.endpoint_plugins")}
    assert eps.get("cpoc") == "cpoc_kernels.integrations.vllm.serve:CpocEndpointPlugin"
    monkeypatch.setenv("VLLM_PLUGINS", "cpoc")
    app = FastAPI()
    app.state.args = SimpleNamespace(log_error_stack=False)
    attach_endpoint_plugins(app, ("generate",))
    init_exception_handler(app)
    assert [p.name for p in app.state.endpoint_plugins] == ["cpoc"]

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cpoc.test") as http:
            return (await http.get("/api/v1/pow/status"),
                    await http.post("/api/v1/pow/init/generate", content=b"{not json",
                                    headers={"Content-Type": "application/json"}))

    status, bad = asyncio.run(calls())
    assert status.status_code == 503 and status.json() == {"detail": "Engine not available"}
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], list)
    monkeypatch.delenv("VLLM_PLUGINS")
    plain = FastAPI()
    attach_endpoint_plugins(plain, ("generate",))
    assert plain.state.endpoint_plugins == []  # not named in VLLM_PLUGINS: not loaded


def test_worker_extension_mechanism():
    from vllm.config import ParallelConfig
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    assert "worker_extension_cls" in field_names(ParallelConfig)
    src = source(WorkerWrapperBase)
    assert "worker_class.__bases__ = worker_class.__bases__ + (" in src  # mixed into the worker class
    assert 'getattr(self._worker_extension_cls, "init_worker_extension", None)' in src
    assert "load_general_plugins()" in source(WorkerWrapperBase.init_worker)


def test_collective_rpc_by_name():
    from vllm import LLM
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.serial_utils import run_method

    assert params(LLM.collective_rpc)[:2] == ["self", "method"]
    assert params(AsyncLLM.collective_rpc)[:2] == ["self", "method"]
    assert "func = getattr(obj, method)" in source(run_method)  # named extension methods, no pickled callables
    assert {"prompt", "sampling_params", "request_id"} <= set(params(AsyncLLM.generate))
    assert "priority" in params(LLM.generate)


def test_additional_config_is_hashed():
    from vllm.config import VllmConfig

    assert "additional_config" in field_names(VllmConfig)
    assert "additional_config" in source(VllmConfig.compute_hash)
    assert isinstance(inspect.getattr_static(VllmConfig, "use_v2_model_runner"), property)


def test_internal_request_ids_get_a_suffix():
    """Why the client matches artifacts by (round, nonce), not by request id."""
    from vllm.v1.engine.input_processor import InputProcessor

    src = source(InputProcessor.assign_request_id)
    assert "external_req_id" in src and "random_uuid" in src


# ------------------------------------------------------------------------------------------ request fields
def test_poc_request_builds_real_vllm_objects():
    prompt, sp = poc_request(PoCRound("b", "k", seq_len=4), 3).to_vllm()
    assert prompt["prompt_token_ids"] == [0] * 4 and prompt["cache_salt"].startswith("cpoc-v1:")
    assert sp.max_tokens == 1 and sp.temperature == 0 and sp.skip_reading_prefix_cache is True
    assert sp.detokenize is False and sp.extra_args["cpoc"]["nonce"] == 3


def test_request_fields():
    from vllm.inputs import TokensPrompt
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert "cache_salt" in typing.get_type_hints(TokensPrompt)
    assert "skip_reading_prefix_cache" in source(Request)
    assert {"req_id", "sampling_params", "prompt_token_ids", "num_computed_tokens"} <= field_names(NewRequestData)
    assert {"finished_req_ids", "preempted_req_ids", "num_scheduled_tokens"} <= field_names(SchedulerOutput)
    # a finished max_tokens=1 request is not scheduled again under async scheduling
    assert "request.num_computed_tokens + 2 - request.num_output_placeholders" in source(Scheduler.schedule)


# ------------------------------------------------------------------------------------------ layer registries
def test_oot_registries_and_signatures():
    from vllm.model_executor.custom_op import CustomOp, PluggableLayer
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    assert "op_registry_oot" in source(PluggableLayer.__new__) and "op_registry_oot" in source(CustomOp.__new__)
    assert "cls.__name__" in source(CustomOp.__new__)  # OOT lookup is by class name: subclasses are not replaced
    assert callable(PluggableLayer.register_oot) and callable(CustomOp.register_oot)
    assert issubclass(VocabParallelEmbedding, PluggableLayer) and issubclass(LogitsProcessor, PluggableLayer)
    assert issubclass(RMSNorm, CustomOp) and RMSNorm.name == "rms_norm"
    assert issubclass(ParallelLMHead, VocabParallelEmbedding) and ParallelLMHead.__name__ != "VocabParallelEmbedding"
    assert params(VocabParallelEmbedding.forward) == ["self", "input_"]
    sig = inspect.signature(LogitsProcessor.forward)
    assert list(sig.parameters) == ["self", "lm_head", "hidden_states", "embedding_bias", "skip_gather"]
    assert sig.parameters["embedding_bias"].default is None and sig.parameters["skip_gather"].default is False
    assert params(RMSNorm.forward_native) == ["self", "x", "residual"]
    assert "self._forward_method(" in source(CustomOp.forward)
    lp = source(LogitsProcessor)
    assert "self.use_all_gather" in lp and "self.org_vocab_size" in lp


def test_qwen3_structure():
    from vllm.model_executor.models.qwen2 import Qwen2Model
    from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

    assert params(Qwen3DecoderLayer.forward) == ["self", "positions", "hidden_states", "residual"]
    layer_src = source(Qwen3DecoderLayer.forward)
    assert "self.input_layernorm(hidden_states, residual)" in layer_src
    assert "return hidden_states, residual" in layer_src
    model_src = source(Qwen2Model.forward)
    assert "layer(positions, hidden_states, residual)" in model_src
    assert "self.norm(hidden_states, residual)" in model_src
    assert "self.logits_processor(self.lm_head, hidden_states)" in source(Qwen3ForCausalLM.compute_logits)
    assert issubclass(Qwen3Model, Qwen2Model)
    assert "support_torch_compile" in inspect.getsource(sys.modules[Qwen3Model.__module__])


# ------------------------------------------------------------------------------------------ V1 / CPU runner
def test_v1_runner_hooks():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert params(GPUModelRunner._model_forward) == ["self", "input_ids", "positions", "intermediate_tensors",
                                                     "inputs_embeds", "model_kwargs"]
    ex = source(GPUModelRunner.execute_model) + source(GPUModelRunner.sample_tokens)
    assert "self._model_forward(" in ex and "self.model.compute_logits(sample_hidden_states)" in ex
    assert "logits_indices = query_start_loc[1:] - 1" in source(GPUModelRunner._prepare_inputs)
    assert "self._model_forward(" not in source(GPUModelRunner._dummy_run)  # dummy runs bypass the hook
    init = source(GPUModelRunner.__init__)
    for attr in ("self.query_start_loc", "self.requests", "self.max_num_tokens", "self.input_batch"):
        assert attr in init, attr
    assert "load_model" in GPUModelRunner.__dict__ and "load_model" in CPUModelRunner.__dict__
    assert issubclass(CPUModelRunner, GPUModelRunner)
    batch = source(InputBatch)
    assert "self.num_computed_tokens_cpu" in batch and "def req_ids" in batch and "def num_reqs" in batch
    assert {"sampling_params", "prompt_token_ids"} <= field_names(CachedRequestState)


# ------------------------------------------------------------------------------------------ Model Runner V2
def test_mrv2_model_state_seam():
    from vllm.v1.worker.gpu import model_states
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as MRV2
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.model_states.interface import ModelState

    assert params(model_states.resolve_model_state_cls) == ["vllm_config", "model"]
    assert "resolve_model_state_cls(vllm_config, model)" in source(model_states.init_model_state)
    assert "init_model_state(" in source(MRV2.load_model)
    assert params(DefaultModelState.__init__) == ["self", "vllm_config", "model", "encoder_cache", "device"]
    assert params(ModelState.add_request) == ["self", "req_index", "new_req_data"]
    assert params(ModelState.remove_request) == ["self", "req_id"]
    assert params(ModelState.prepare_inputs) == ["self", "input_batch", "req_states"]
    assert params(ModelState.prepare_dummy_inputs) == ["self", "num_reqs", "num_tokens"]
    ex = source(MRV2.execute_model)
    assert ex.index("self.model_state.prepare_inputs(") < ex.index("self.cudagraph_manager.run_fullgraph(")
    assert "self.model_state.add_request(" in source(MRV2.add_requests)
    assert "self.model_state.remove_request(" in inspect.getsource(MRV2)
    assert "preempted_req_ids" in source(MRV2.finish_requests)
    sample = source(MRV2.sample)
    assert "hidden_states[input_batch.logits_indices]" in sample and "self.model.compute_logits(" in sample
    assert {"req_ids", "num_reqs", "query_start_loc_np", "num_computed_tokens_np", "logits_indices"} <= field_names(InputBatch)


# ------------------------------------------------------------------------------------------ config fields
def test_config_fields_checked_at_attach():
    from vllm.config import CacheConfig, CompilationConfig, ModelConfig, ParallelConfig, SchedulerConfig

    assert isinstance(inspect.getattr_static(ParallelConfig, "use_ubatching"), property)
    assert {"prefill_context_parallel_size", "enable_batch_sharded_sampling"} <= field_names(ParallelConfig)
    assert "kv_sharing_fast_prefill" in field_names(CacheConfig)
    assert "cudagraph_mode" in field_names(CompilationConfig)
    assert "max_num_batched_tokens" in field_names(SchedulerConfig)
    assert "runner_type" in source(ModelConfig)


# ------------------------------------------------------------------------------------------ CUDA graphs (opt-in)
def test_cuda_graph_facts_the_static_buffers_rely_on():
    """The PoC buffers are sized max_num_batched_tokens and sliced by the forward's (padded) row count: every
    capture size is capped at it; the row contract runs before the model call / graph replay; the logits
    stage (host reads) runs outside the captured model; the mode names the refusal compares against."""
    from vllm.compilation.cuda_graph import CUDAGraphWrapper
    from vllm.config import VllmConfig
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert CUDAGraphMode.NONE.name == "NONE" and {"PIECEWISE", "FULL"} <= set(CUDAGraphMode.__members__)
    sizes = source(VllmConfig._set_cudagraph_sizes)
    assert "max_num_tokens = self.scheduler_config.max_num_batched_tokens" in sizes
    assert "max_cudagraph_capture_size = min(max_num_tokens, max_cudagraph_capture_size)" in sizes
    assert "i for i in dedup_sizes if i <= max_num_tokens" in sizes  # explicit capture sizes are filtered too
    assert "self.max_num_tokens = scheduler_config.max_num_batched_tokens" in source(GPUModelRunner.__init__)
    assert "return self.model(" in source(GPUModelRunner._model_forward)  # the wrapped hook encloses the replay
    assert "return getattr(self.runnable, key)" in source(CUDAGraphWrapper.__getattr__)  # compute_logits: eager


# ------------------------------------------------------------------------------------------ installation
INSTALL_CHECK = r"""
import os, sys
os.environ["VLLM_TARGET_DEVICE"] = "cpu"
from vllm.plugins import load_general_plugins
load_general_plugins()
import cpoc_kernels.integrations.vllm as plugin
assert plugin.plugin_status()["registered"], plugin.plugin_status()
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
import vllm.v1.worker.cpu_model_runner as cpu_runner
import vllm.v1.worker.gpu_model_runner as v1
from vllm.v1.worker.gpu import model_states
assert op_registry_oot["RMSNorm"].__name__ == "CpocRMSNorm" and op_registry_oot["RMSNorm"].name == "rms_norm"
assert op_registry_oot["VocabParallelEmbedding"].__name__ == "CpocVocabParallelEmbedding"
assert op_registry_oot["LogitsProcessor"].__name__ == "CpocLogitsProcessor"
assert v1.GPUModelRunner._model_forward._cpoc_wrapped and v1.GPUModelRunner.load_model._cpoc_wrapped
assert cpu_runner.CPUModelRunner.load_model._cpoc_wrapped
assert model_states.resolve_model_state_cls._cpoc_wrapped
plugin.register(); load_general_plugins()  # idempotent
print("INSTALLED")
"""


def test_general_plugin_installs_every_seam_in_a_fresh_process(tmp_path):
    out = subprocess.run([sys.executable, "-c", INSTALL_CHECK], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert "INSTALLED" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_unsupported_version_fails_startup_clearly(tmp_path):
    code = ("import vllm; vllm.__version__ = '0.31.0'\n"
            "from vllm.plugins import load_general_plugins\nload_general_plugins()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "UnsupportedVllmError" in out.stderr and "supports vLLM 0.32.x, 0.33.x" in out.stderr


def test_mrv2_resolver_wrap_mixes_in_only_when_enabled():
    from types import SimpleNamespace

    class Base:
        pass

    module = SimpleNamespace(resolve_model_state_cls=lambda cfg, model: Base)
    seams.install_model_states(module)
    seams.install_model_states(module)  # idempotent
    on = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=seams.WORKER_EXTENSION),
                         additional_config={})
    off = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=""), additional_config={})
    cls = module.resolve_model_state_cls(on, None)
    assert cls.__mro__[1:3] == (seams.CpocModelStateMixin, Base) and cls.__name__ == "CpocBase"
    assert module.resolve_model_state_cls(off, None) is Base
    bad = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=""), additional_config={"cpoc": {}})
    with pytest.raises(plugin.UnsupportedVllmError, match="--worker-extension-cls"):
        module.resolve_model_state_cls(bad, None)
