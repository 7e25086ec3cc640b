"""Where the plugin meets vLLM: OOT layer registration, attaching the state to a loaded model, the runner
hooks that build each step's row contract, and the Model Runner V2 ``ModelState`` mixin.

Seams used (shared/spec/vllm_integration.md §2.1):

* public registries: ``CustomOp.register_oot`` (RMSNorm), ``PluggableLayer.register_oot``
  (VocabParallelEmbedding, LogitsProcessor) — installed when their vLLM modules are imported;
* V1 / CPU runner (documented hooks): ``GPUModelRunner._model_forward`` (row contract around the model
  call) and ``load_model`` (attach before the first forward; ``CPUModelRunner`` overrides it, so both);
* Model Runner V2: the one module-function wrap, ``model_states.resolve_model_state_cls`` → the resolved
  class with :class:`CpocModelStateMixin` in front (``add_request``/``remove_request``/``prepare_inputs``).
"""
from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys
import threading
from collections.abc import Callable

import torch

from .state import CpocBuffers, CpocWorkerState, RequestView
from .version import WORKER_EXTENSION, UnsupportedVllmError

logger = logging.getLogger("cpoc_kernels.vllm")

_ATTACHED: list[CpocWorkerState] = []


def attached_state() -> CpocWorkerState | None:
    """The state of this process's model (None before a model was attached)."""
    return _ATTACHED[-1] if _ATTACHED else None


# ============================================================================================ import hooks
_pending: dict[str, list[Callable]] = {}
_hook_lock = threading.RLock()


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a watched module finished executing (cheap: only names are compared)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec_):
                return loader.create_module(spec_)

            def exec_module(self, module):
                original_exec(module)
                _run_callbacks(fullname, module)

        spec.loader = _Loader()
        return spec


_finder = _AfterImportFinder()


def _run_callbacks(name: str, module) -> None:
    with _hook_lock:
        callbacks = _pending.pop(name, [])
    for callback in callbacks:
        callback(module)


def when_imported(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` now if ``name`` is imported, else right after it is."""
    with _hook_lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback(module)


# ============================================================================================ OOT layers
def install_rmsnorm(module) -> None:
    from .layers import make_rmsnorm_cls

    base = module.RMSNorm
    cls = make_rmsnorm_cls(base)
    base.register_oot(cls)
    cls.name = base.name  # keep the custom-op switch name ("rms_norm"): +/-rms_norm behave as without plugin


def install_embedding(module) -> None:
    from .layers import make_embedding_cls

    base = module.VocabParallelEmbedding
    base.register_oot(make_embedding_cls(base))


def install_logits_processor(module) -> None:
    from .layers import make_logits_processor_cls

    base = module.LogitsProcessor
    base.register_oot(make_logits_processor_cls(base))


# ============================================================================================ attach


def plugin_enabled(vllm_config) -> bool:
    """PoC is on for an engine started with the cpoc worker extension (or ``additional_config["cpoc"]``).

    ``additional_config["cpoc"]`` without the worker extension → :class:`UnsupportedVllmError` (artifacts
    could not be collected). An engine with neither runs exactly as without the plugin.
    """
    extension = getattr(vllm_config.parallel_config, "worker_extension_cls", "") or ""
    options = (getattr(vllm_config, "additional_config", None) or {}).get("cpoc")
    if options is not None and extension != WORKER_EXTENSION:
        raise UnsupportedVllmError(
            f"additional_config['cpoc'] is set but the worker extension is {extension or 'missing'}: start vLLM "
            f"with --worker-extension-cls {WORKER_EXTENSION} (LLM(worker_extension_cls=...))")
    return extension == WORKER_EXTENSION or options is not None


ALLOW_CUDA_GRAPHS_ENV = "CPOC_VLLM_ALLOW_CUDA_GRAPHS"


def cuda_graphs_allowed(vllm_config) -> bool:
    """Opt-in to CUDA graphs: ``additional_config["cpoc"]["allow_cuda_graphs"] = True`` (part of vLLM's compile-cache
    hash) or ``CPOC_VLLM_ALLOW_CUDA_GRAPHS=1`` in the workers' environment. Read once at attach, never in traced code.

    Default off. What the forward runs is graph-safe by construction — static buffers allocated at attach and
    updated in place before each step (``begin_step`` runs before the model call or the graph replay in both
    runners), the reflection's launch grid fixed by the (padded) token count with per-row masks, no host read
    or data-dependent shape — and tested on CPU only (compiled forwards without retrace when the masks
    change). Not verified on a GPU: FULL/PIECEWISE capture and replay, async scheduling's overlap of the next
    step's buffer writes with the running graph, padded batches.
    """
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("cpoc") or {}
    return extra.get("allow_cuda_graphs") is True or os.environ.get(ALLOW_CUDA_GRAPHS_ENV) == "1"


def check_engine_config(vllm_config) -> None:
    """Refuse configurations the plugin is not verified with (clear error at model load, never wrong artifacts).

    CUDA graphs are refused unless opted in (:func:`cuda_graphs_allowed`).
    """
    problems = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding (logits rows are not one per request)")
    if getattr(vllm_config, "lora_config", None) is not None:
        problems.append("LoRA (wraps the logits path)")
    par = vllm_config.parallel_config
    if getattr(par, "use_ubatching", False):
        problems.append("micro-batching / dual-batch overlap (the model runs on sub-slices of the batch)")
    if getattr(par, "prefill_context_parallel_size", 1) > 1:
        problems.append("prefill context parallelism")
    if getattr(par, "enable_batch_sharded_sampling", False):
        problems.append("batch-sharded sampling")
    if getattr(vllm_config.cache_config, "kv_sharing_fast_prefill", False):
        problems.append("kv_sharing_fast_prefill")
    if getattr(vllm_config.model_config, "runner_type", "generate") != "generate":
        problems.append(f"runner {vllm_config.model_config.runner_type!r} (only 'generate')")
    if vllm_config.device_config.device.type == "cuda":
        mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
        name = getattr(mode, "name", str(mode))
        if mode is not None and name != "NONE":
            if cuda_graphs_allowed(vllm_config):
                logger.warning("cpoc: CUDA graphs (cudagraph_mode=%s) allowed by opt-in: the in-model PoC path is "
                               "graph-safe by construction (static buffers, launch grids fixed by the token count, "
                               "no host reads) but has not been verified on a GPU", name)
            else:
                problems.append(f"CUDA graphs (cudagraph_mode={name}) by default: the in-model PoC path is graph-safe "
                                f"by construction but not verified on a GPU; start with --enforce-eager or "
                                f"-cc.cudagraph_mode=NONE, or opt in with additional_config "
                                f"{{\"cpoc\": {{\"allow_cuda_graphs\": true}}}} (or {ALLOW_CUDA_GRAPHS_ENV}=1)")
    if problems:
        raise UnsupportedVllmError("cpoc continuous PoC does not support: " + "; ".join(problems))


def _decoder_model(model: torch.nn.Module):
    inner = getattr(model, "model", None)
    for name in ("layers", "start_layer", "end_layer", "embed_tokens", "norm"):
        if not hasattr(inner, name):
            raise UnsupportedVllmError(f"cpoc: {type(model).__name__}.model has no {name!r}; supported models have "
                                       f"Qwen2Model's structure (Qwen3, Qwen2, Llama-style decoders)")
    return inner


def attach(model: torch.nn.Module, vllm_config, max_tokens: int | None = None,
           slots: int | None = None) -> CpocWorkerState:
    """Create the buffers under ``model.model.cpoc`` and mark the model's OOT layers (before the first forward).

    Idempotent per model. Raises :class:`UnsupportedVllmError` when the OOT classes are not in use (plugin
    registered too late) or the configuration is unsupported.
    """
    existing = getattr(getattr(model, "model", None), "cpoc", None)
    if isinstance(existing, CpocBuffers):
        return existing._cpoc_state
    check_engine_config(vllm_config)
    inner = _decoder_model(model)
    hf = vllm_config.model_config.hf_config
    text = getattr(hf, "get_text_config", lambda: hf)()
    hidden, num_layers = int(text.hidden_size), int(text.num_hidden_layers)
    param = next(model.parameters())
    dtype, device = vllm_config.model_config.dtype, param.device
    tokens = int(max_tokens or vllm_config.scheduler_config.max_num_batched_tokens)
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("cpoc", {}) or {}
    slots = int(slots or extra.get("round_slots", 2))
    buffers = CpocBuffers(tokens, hidden, num_layers, dtype, device, slots)
    state = CpocWorkerState(buffers, num_layers, hidden, dtype, device)

    def oot(module, class_name: str) -> bool:
        return type(module).__name__ == class_name

    marked = 0
    for i in range(inner.start_layer, inner.end_layer):
        if i == 0:
            continue
        norm = inner.layers[i].input_layernorm
        if not oot(norm, "CpocRMSNorm"):
            raise UnsupportedVllmError(f"cpoc: layer {i}'s input_layernorm is {type(norm).__name__}, not the plugin's "
                                       f"RMSNorm (is the 'cpoc' general plugin loaded in this process?)")
        object.__setattr__(norm, "_cpoc_buffers", buffers)
        norm._cpoc_layer = i - 1
        marked += 1
    if oot(inner.norm, "CpocRMSNorm"):  # last PP rank
        object.__setattr__(inner.norm, "_cpoc_buffers", buffers)
        inner.norm._cpoc_layer = num_layers - 1
        marked += 1
        processor = getattr(model, "logits_processor", None)
        if not oot(processor, "CpocLogitsProcessor"):
            raise UnsupportedVllmError(f"cpoc: logits_processor is {type(processor).__name__}, not the plugin's")
        object.__setattr__(processor, "_cpoc_state", state)
        state.has_logits_stage = True
    elif type(inner.norm).__name__ != "PPMissingLayer":
        raise UnsupportedVllmError(f"cpoc: final norm is {type(inner.norm).__name__}, not the plugin's RMSNorm")
    if oot(inner.embed_tokens, "CpocVocabParallelEmbedding"):  # first PP rank
        object.__setattr__(inner.embed_tokens, "_cpoc_buffers", buffers)
    elif type(inner.embed_tokens).__name__ != "PPMissingLayer":
        raise UnsupportedVllmError(f"cpoc: embed_tokens is {type(inner.embed_tokens).__name__}, not the plugin's")
    inner.cpoc = buffers
    object.__setattr__(buffers, "_cpoc_state", state)
    state.marked_norms = marked
    _ATTACHED.append(state)
    logger.info("cpoc: attached (layers %d..%d of %d, %d norms marked, %d-token buffers)", inner.start_layer,
                inner.end_layer, num_layers, marked, tokens)
    return state


# ============================================================================================ V1 / CPU runner
def _v1_request_view(runner, request_id: str) -> RequestView | None:
    req = runner.requests.get(request_id)
    if req is None or req.sampling_params is None:
        return None
    sp = req.sampling_params
    prompt_len = len(req.prompt_token_ids) if req.prompt_token_ids is not None else -1
    return RequestView(sp.extra_args, sp.skip_reading_prefix_cache, sp.max_tokens, prompt_len)


def _wrap_v1_model_forward(original):
    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        state = getattr(self, "_cpoc_state", None)
        if state is None:
            return original(self, *args, **kwargs)
        batch = self.input_batch
        num_reqs = batch.num_reqs
        stale = [rid for rid in state.known_request_ids() if rid not in self.requests]
        if stale:
            state.forget(stale)
        state.begin_step(batch.req_ids[:num_reqs], self.query_start_loc.np[: num_reqs + 1],
                         batch.num_computed_tokens_cpu[:num_reqs], lambda rid: _v1_request_view(self, rid))
        try:
            return original(self, *args, **kwargs)
        finally:
            state.end_forward()

    _model_forward._cpoc_wrapped = True
    return _model_forward


def _wrap_v1_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, "_cpoc_state", None) is None and plugin_enabled(self.vllm_config):
            self._cpoc_state = attach(self.model, self.vllm_config,
                                      max_tokens=getattr(self, "max_num_tokens", None))
        return result

    load_model._cpoc_wrapped = True
    return load_model


def _patch_method(cls, name: str, wrapper_factory) -> None:
    current = cls.__dict__.get(name)
    if current is None or getattr(current, "_cpoc_wrapped", False):
        return
    setattr(cls, name, wrapper_factory(current))


def install_gpu_model_runner(module) -> None:
    cls = module.GPUModelRunner
    _patch_method(cls, "_model_forward", _wrap_v1_model_forward)
    _patch_method(cls, "load_model", _wrap_v1_load_model)


def install_cpu_model_runner(module) -> None:
    _patch_method(module.CPUModelRunner, "load_model", _wrap_v1_load_model)


# ============================================================================================ Model Runner V2
class CpocModelStateMixin:
    """Put in front of the resolved MRV2 ``ModelState``: registry from ``NewRequestData`` and the row contract
    in ``prepare_inputs`` (called every step, real or dummy, before the model call or graph replay)."""

    def __init__(self, vllm_config, model, *args, **kwargs):
        super().__init__(vllm_config, model, *args, **kwargs)
        self._cpoc_views: dict[str, RequestView] = {}
        self._cpoc_state = attach(model, vllm_config)

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        sp = new_req_data.sampling_params
        if sp is not None:
            prompt = new_req_data.prompt_token_ids
            self._cpoc_views[new_req_data.req_id] = RequestView(
                sp.extra_args, sp.skip_reading_prefix_cache, sp.max_tokens, len(prompt) if prompt is not None else -1)
            self._cpoc_state.forget([new_req_data.req_id])  # re-added after preemption: start over

    def remove_request(self, req_id) -> None:
        super().remove_request(req_id)
        self._cpoc_views.pop(req_id, None)
        self._cpoc_state.forget([req_id])

    def prepare_inputs(self, input_batch, req_states):
        num_reqs = input_batch.num_reqs
        self._cpoc_state.begin_step(list(input_batch.req_ids[:num_reqs]), input_batch.query_start_loc_np,
                                    input_batch.num_computed_tokens_np, self._cpoc_views.get)
        return super().prepare_inputs(input_batch, req_states)

    def prepare_dummy_inputs(self, num_reqs, num_tokens):
        self._cpoc_state.clear_rows()
        return super().prepare_dummy_inputs(num_reqs, num_tokens)


@functools.lru_cache(maxsize=None)
def cpoc_model_state_cls(base: type) -> type:
    return type("Cpoc" + base.__name__, (CpocModelStateMixin, base), {})


def install_model_states(module) -> None:
    original = module.resolve_model_state_cls
    if getattr(original, "_cpoc_wrapped", False):
        return

    @functools.wraps(original)
    def resolve_model_state_cls(vllm_config, model):
        base = original(vllm_config, model)
        return cpoc_model_state_cls(base) if plugin_enabled(vllm_config) else base

    resolve_model_state_cls._cpoc_wrapped = True
    module.resolve_model_state_cls = resolve_model_state_cls


# ============================================================================================ install all
SEAMS = {
    "vllm.model_executor.layers.layernorm": install_rmsnorm,
    "vllm.model_executor.layers.vocab_parallel_embedding": install_embedding,
    "vllm.model_executor.layers.logits_processor": install_logits_processor,
    "vllm.v1.worker.gpu_model_runner": install_gpu_model_runner,
    "vllm.v1.worker.cpu_model_runner": install_cpu_model_runner,
    "vllm.v1.worker.gpu.model_states": install_model_states,
}


def install_seams() -> None:
    for name, installer in SEAMS.items():
        when_imported(name, installer)
