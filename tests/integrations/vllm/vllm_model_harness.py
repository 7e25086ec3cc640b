"""Test harness: vLLM's real Qwen3 model object on CPU, HF weights, a test attention op.

Not a test module (imported by the vLLM model-object tests only, inside the vLLM 0.33 venv). The real CPU
attention kernels need ``vllm._C`` (absent from the CUDA wheel), and with no attention metadata the backend
returns uninitialised memory, so ``Attention.forward`` is replaced (test only) by an opaque op doing causal
SDPA per request segment with a per-request KV store, like a paged-KV engine would.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass

import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

TINY = dict(head_dim=16)  # the HF tiny model as built by cpoc_kernels (vLLM's CPU kernels are not used here)


@dataclass
class Segment:
    request: str
    row_start: int
    n_rows: int
    position: int


class AttentionContext:
    """Per-step segments and the per-(request, layer) KV store read by the test attention op."""

    segments: list[Segment] = []
    kv: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    layers: dict[str, object] = {}

    @classmethod
    def reset(cls):
        cls.segments, cls.kv = [], {}


@torch.library.custom_op("cpoc_test::segment_attention", mutates_args=())
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_name: str) -> torch.Tensor:
    layer = AttentionContext.layers[layer_name]
    nh, nkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_size
    out = torch.zeros(q.shape[0], nh * hd, dtype=q.dtype)
    for seg in AttentionContext.segments:
        rows = slice(seg.row_start, seg.row_start + seg.n_rows)
        qs = q[rows].view(seg.n_rows, nh, hd).transpose(0, 1)
        ks = k[rows].view(seg.n_rows, nkv, hd)
        vs = v[rows].view(seg.n_rows, nkv, hd)
        key = (seg.request, layer_name)
        past_k, past_v = AttentionContext.kv.get(key, (ks[:0], vs[:0]))
        if past_k.shape[0] != seg.position:
            raise RuntimeError(f"{key}: KV holds {past_k.shape[0]} positions, segment starts at {seg.position}")
        all_k, all_v = torch.cat([past_k, ks]), torch.cat([past_v, vs])
        AttentionContext.kv[key] = (all_k, all_v)
        kk = all_k.transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        vv = all_v.transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        q_pos = torch.arange(seg.position, seg.position + seg.n_rows)[:, None]
        mask = torch.arange(all_k.shape[0])[None, :] <= q_pos
        o = torch.nn.functional.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask, scale=layer.impl_scale)
        out[rows] = o.transpose(0, 1).reshape(seg.n_rows, nh * hd)
    return out


@segment_attention.register_fake
def _(q, k, v, layer_name):
    return q.new_empty(q.shape[0], q.shape[1])


def _test_attention_forward(self, query, key, value, output_shape=None, output_dtype=None):
    return torch.ops.cpoc_test.segment_attention(query, key, value, self.layer_name)


def save_hf_model(path: str, **overrides):
    """Save the package's deterministic tiny Qwen3 (HF) to ``path``; returns the HF model (fp32)."""
    from cpoc_kernels.integrations.hf.models import build_model

    hf = build_model("cpoc-tiny", **overrides)
    hf.save_pretrained(path)
    return hf


_DIST = False


def init_single_process_distributed():
    global _DIST
    if _DIST:
        return
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    tmp = tempfile.mkdtemp()
    init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                 distributed_init_method=f"file://{tmp}/dist", backend="gloo")
    initialize_model_parallel(1, 1)
    _DIST = True


def build_vllm_qwen3(model_dir: str, hf_model, compile: bool = False, additional_config: dict | None = None,
                     max_num_batched_tokens: int = 64):
    """(vllm_config, model): vLLM's Qwen3ForCausalLM with the HF model's weights, test attention installed."""
    from vllm.config import CompilationConfig, ModelConfig, SchedulerConfig, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import CompilationMode
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    Attention.forward = _test_attention_forward
    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float32", enforce_eager=not compile,
                               max_model_len=256)
    compilation = CompilationConfig(custom_ops=["none"],
                                    mode=CompilationMode.DYNAMO_TRACE_ONCE if compile else CompilationMode.NONE)
    scheduler = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=8, max_model_len=256,
                                is_encoder_decoder=False)
    vllm_config = VllmConfig(model_config=model_config, compilation_config=compilation, scheduler_config=scheduler,
                             additional_config=additional_config or {})
    with set_current_vllm_config(vllm_config):
        init_single_process_distributed()
        model = Qwen3ForCausalLM(vllm_config=vllm_config)
        loaded = model.load_weights(hf_model.state_dict().items())
        if not loaded:
            raise RuntimeError("no weights loaded")
        for module in model.modules():
            method = getattr(getattr(module, "quant_method", None), "process_weights_after_loading", None)
            if method is not None:
                method(module)
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.impl_scale = module.impl.scale if hasattr(module, "impl") else module.head_size ** -0.5
            AttentionContext.layers[module.layer_name] = module
    return vllm_config, model.eval()


# --------------------------------------------------------------------------------------------- step driver
@dataclass
class Req:
    """One request's rows in a step: chat (``tokens``) or PoC (``spec`` from ``poc_request``)."""

    request_id: str
    position: int
    n_rows: int
    tokens: list[int] | None = None
    spec: object = None
    skip_reading_prefix_cache: bool = True
    prompt_len: int | None = None


@dataclass
class StepOutput:
    hidden: torch.Tensor
    logits: torch.Tensor
    query_start_loc: list[int]
    plan_used: bool


_PADDING = itertools.count()


def run_step(model, vllm_config, state, reqs: list[Req], poc_on: bool = True, pad_rows: int = 0) -> StepOutput:
    """One engine-like step: flat batch, row contract (if ``state``), forward, logits of each request's last row.

    ``pad_rows``: the forward gets that many extra token-0 rows after the batch (as a CUDA-graph replay pads the
    batch to a captured size); the row contract and the logits only see the real requests.
    """
    from vllm.forward_context import set_forward_context

    from cpoc_kernels.integrations.vllm.state import RequestView

    ids, pos, qsl = [], [], [0]
    AttentionContext.segments = []
    for r in reqs:
        toks = r.tokens[r.position : r.position + r.n_rows] if r.tokens is not None else [0] * r.n_rows
        AttentionContext.segments.append(Segment(r.request_id, qsl[-1], r.n_rows, r.position))
        ids += toks
        pos += list(range(r.position, r.position + r.n_rows))
        qsl.append(qsl[-1] + r.n_rows)
    views = {}
    for r in reqs:
        if r.spec is not None and poc_on:
            kw = r.spec.sampling_kwargs
            views[r.request_id] = RequestView(kw["extra_args"], r.skip_reading_prefix_cache, kw["max_tokens"],
                                              r.prompt_len if r.prompt_len is not None else len(r.spec.prompt["prompt_token_ids"]))
        else:
            views[r.request_id] = RequestView(None, False, 8, len(r.tokens) if r.tokens else r.n_rows)
    if state is not None:
        state.begin_step([r.request_id for r in reqs], qsl, [r.position for r in reqs], views.get)
    if pad_rows:
        AttentionContext.segments.append(Segment(f"cpoc-padding-{next(_PADDING)}", qsl[-1], pad_rows, 0))
        ids += [0] * pad_rows
        pos += list(range(pad_rows))
    try:
        with torch.inference_mode(), set_forward_context(None, vllm_config):
            hidden = model(input_ids=torch.tensor(ids), positions=torch.tensor(pos))
            last = torch.tensor(qsl[1:]) - 1
            plan_before = state is not None and state._plan is not None
            logits = model.compute_logits(hidden[last])
    finally:
        if state is not None:
            state.end_forward()
    return StepOutput(hidden.clone(), logits, qsl, plan_before)
