"""Continuous PoC inside transformers' own continuous batching (``ContinuousBatchingManager``).

A PoC nonce is a request of ``seq_len`` placeholder token ids with ``max_new_tokens=1``. Hooks make the engine's
forward compute the nonce exactly as a pure-PoC forward would (spec §4–§6), on its rows only; chat is scheduled
first, PoC only into what the governor allows; PoC outputs never reach chat. An exception inside PoC handling
disables PoC (in-flight PoC requests are cancelled), is recorded in :meth:`ContinuousPoC.stats`, and chat continues.

The package follows the data; each module's docstring says what it owns and what it may not touch:

* :mod:`.engine` — the one place that knows transformers' CB private API (supported: transformers
  5.20–5.24, tested on 5.24.0), :func:`cb_config`;
* :mod:`.scheduling` — chat first, governor budget, PoC admission and preemption, the step clock;
* :mod:`.hooks` — what happens to PoC rows inside one forward (embedding, reflection, readout rows, LM-head
  exclusion);
* :mod:`.worker` — what happens off the engine thread (input prefetch, readout, step-time fit);
* :mod:`.outputs` — PoC outputs filtered from the chat output router; chat latency statistics;
* :mod:`.state` — what the parts of one attachment share (round, in-flight nonces, counters, failure);
* :mod:`.poc` — the public :class:`ContinuousPoC` facade (attach/detach, start/stop/wait, stats).

Requirements: ``allow_block_sharing=False``, no async batching, no CUDA graphs (checked at attach); sizes set
explicitly on CPU (:func:`cb_config`). Not supported: tensor parallelism (PoC requests bypass the TP driver's
input queue), CPU KV offloading space (``cpu_offload_space``; soft resets are fine: positions are absolute).
"""
from __future__ import annotations

from .engine import (SUPPORTED_TRANSFORMERS, CBInternals, UnsupportedEngineError, _CBInternals, cb_config,
                     check_transformers_version, model_parts, transformers_supported)
from .hooks import reflect_rows_
from .poc import ContinuousPoC
from .state import PoCFailure
from .worker import poc_input_embeddings

__all__ = ["CBInternals", "ContinuousPoC", "PoCFailure", "SUPPORTED_TRANSFORMERS", "UnsupportedEngineError",
           "_CBInternals", "cb_config", "check_transformers_version", "model_parts", "poc_input_embeddings",
           "reflect_rows_", "transformers_supported"]
