"""Engine-independent ML-node PoC service: the network backend's ``/api/v1/pow/*`` contract (spec mlnode_api.md)
over an :class:`~cpoc_kernels.service.engine.EngineAdapter`.

* :mod:`.models` — request bodies (pydantic), the network's field names and defaults;
* :mod:`.engine` — the adapter interface an engine implements (HF: ``integrations/hf/service_engine.py``);
* :mod:`.callbacks` — the callback sender (``/generated``, ``/validated``): bounded buffer, retries, counted drops;
* :mod:`.service` — :class:`PoCService`: state machine, nonce partition, mining, validation jobs, ``/status``;
* :mod:`.routes` — ``build_router(service)``: the FastAPI routes, the thin HTTP layer.

Importing this package does not import FastAPI (only :mod:`.routes` does).
"""
from .engine import BatchedEngineAdapter, EmitFn, EngineAdapter, EngineLoad, RoundSpec

__all__ = ["BatchedEngineAdapter", "EmitFn", "EngineAdapter", "EngineLoad", "RoundSpec"]
