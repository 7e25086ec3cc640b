"""Out-of-tree layer classes installed through vLLM's public registries (imported only inside vLLM).

* ``RMSNorm`` (``CustomOp.register_oot``): a marked instance reflects (hidden, residual) on PoC rows before
  normalising — layer *i*'s ``input_layernorm`` with vector *i−1*, the final norm with vector *L−1*
  (the spec's placement B: same arithmetic as reflecting each layer's output, no model-class patch).
* ``VocabParallelEmbedding`` (``PluggableLayer.register_oot``): PoC rows get their input embeddings.
* ``LogitsProcessor`` (``PluggableLayer.register_oot``): LM head on chat rows only; completing PoC rows
  are read out; PoC rows get all-zero logits (greedy token 0, the request then finishes).

Unmarked instances (q/k norms, other models, drafters) behave exactly like the originals.

Inside the model forward (compiled, possibly CUDA-graph captured) only the first two run, and both read static
buffers only (``CpocBuffers``): ``where(mask[:n], embeds[:n], out)`` and ``cpoc_vllm::reflect_rows_`` (row-mask
kernel, grid fixed by ``n``) — no host sync, no data-dependent shape. The logits processor runs after the
forward, eagerly (vLLM computes logits outside the captured region); its host reads are fine there.
Each ``make_*`` builds the subclass of the class it is given (called once that vLLM module is imported).
"""
from __future__ import annotations

import torch


def make_rmsnorm_cls(rmsnorm_cls):
    class CpocRMSNorm(rmsnorm_cls):
        _cpoc_buffers = None
        _cpoc_layer = -1

        def forward(self, x, residual=None):
            buffers = self._cpoc_buffers
            if buffers is not None and residual is not None:
                buffers.reflect_(x, residual, self._cpoc_layer)
            return super().forward(x, residual)

    CpocRMSNorm.__qualname__ = CpocRMSNorm.__name__
    return CpocRMSNorm


def make_embedding_cls(embedding_cls):
    class CpocVocabParallelEmbedding(embedding_cls):
        _cpoc_buffers = None

        def forward(self, input_):
            out = super().forward(input_)
            buffers = self._cpoc_buffers
            if buffers is None:
                return out
            return buffers.inject(out)

    CpocVocabParallelEmbedding.__qualname__ = CpocVocabParallelEmbedding.__name__
    return CpocVocabParallelEmbedding


def make_logits_processor_cls(logits_processor_cls):
    class CpocLogitsProcessor(logits_processor_cls):
        _cpoc_state = None

        def forward(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False):
            state = self._cpoc_state
            plan = None if state is None or skip_gather else state.take_logits_plan(hidden_states.shape[0])
            if plan is None or not plan.poc_rows:
                return super().forward(lm_head, hidden_states, embedding_bias, skip_gather)
            if plan.completions:
                state.read_out(plan, hidden_states)
            n = hidden_states.shape[0]
            chat = plan.chat_rows()
            state.counters["lm_head_rows"] += len(chat)
            if not chat:
                if not self.use_all_gather:
                    from vllm.distributed import get_tensor_model_parallel_rank

                    if get_tensor_model_parallel_rank() != 0:
                        return None  # as the gather would: only rank 0 gets logits
                return hidden_states.new_zeros((n, self.org_vocab_size))
            index = torch.tensor(chat, dtype=torch.int64, device=hidden_states.device)
            chat_logits = super().forward(lm_head, hidden_states.index_select(0, index), embedding_bias, skip_gather)
            if chat_logits is None:
                return None
            logits = chat_logits.new_zeros((n, chat_logits.shape[1]))
            logits.index_copy_(0, index, chat_logits)
            return logits

    CpocLogitsProcessor.__qualname__ = CpocLogitsProcessor.__name__
    return CpocLogitsProcessor
