"""Worker extension (``--worker-extension-cls cpoc_kernels.integrations.vllm.worker.CpocWorkerExtension``).

vLLM mixes this class into its worker class; its methods are called through ``collective_rpc`` by name
(no pickled callables, so ``VLLM_ALLOW_INSECURE_SERIALIZATION`` is not needed). Everything returned is
plain str/int/float/bool/None/list/dict (msgpack-safe, no tensors).
"""
from __future__ import annotations

from .seams import WORKER_EXTENSION, attached_state

__all__ = ["WORKER_EXTENSION", "CpocWorkerExtension"]


class CpocWorkerExtension:
    def init_worker_extension(self) -> None:
        """vLLM ≥ 0.33 calls this after ``init_device``: the plugin must be registered in this process."""
        from . import plugin_status

        status = plugin_status()
        if not status["registered"]:
            raise RuntimeError(f"cpoc worker extension is set but the 'cpoc' vLLM general plugin is not loaded in "
                               f"this worker process ({status['error'] or 'not registered'}); install cpoc_kernels in "
                               f"the workers' environment and do not exclude 'cpoc' from VLLM_PLUGINS")

    def cpoc_ready(self) -> dict:
        """Plugin and attach status of this worker."""
        from . import plugin_status

        state = attached_state()
        rank = getattr(self, "rank", None)
        return {**plugin_status(), "rank": rank, "attached": state is not None,
                "marked_norms": getattr(state, "marked_norms", 0) if state is not None else 0,
                "has_logits_stage": bool(state is not None and state.has_logits_stage)}

    def cpoc_drain(self, keys: list | None = None) -> list[dict]:
        """Artifacts computed since the last drain (and refusals: ``vector_b64`` None, ``error`` set); with
        ``keys`` (``[block_hash, public_key, seq_len, nonce]`` lists) only those, the rest stay for other clients."""
        state = attached_state()
        return [] if state is None or not state.has_logits_stage else state.drain(keys)

    def cpoc_stats(self) -> dict:
        state = attached_state()
        return {} if state is None else state.stats()
