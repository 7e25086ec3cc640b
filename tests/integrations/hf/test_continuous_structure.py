"""The continuous-PoC package keeps its shape: small files that say what they own, and one module (engine.py)
that knows transformers' continuous-batching private API."""
from __future__ import annotations

import ast
import pathlib

import cpoc_kernels.integrations.hf.continuous as continuous
from cpoc_kernels.integrations.hf.continuous.engine import CBInternals

PACKAGE = pathlib.Path(continuous.__file__).parent
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
# names of transformers' CB internals (attributes of the manager, batch processor, scheduler, cache, future states)
PRIVATE_API = {"manager", "batch_processor", "output_router", "_create_batch_processor", "background_thread_status",
               "continuous_batching_config", "inputs_and_outputs", "requests_in_batch", "waiting_requests",
               "active_requests", "waiting_requests_order", "max_requests_per_batch", "starved_requests",
               "set_request_cancellation", "clear_cancelled_requests", "add_waiting_request", "max_tokens_read",
               "compute_free_capacity", "_wake_up_loop", "query_length", "generated_len", "has_new_token",
               "remaining_prefill_tokens", "schedule_batch", "has_pending_requests", "position_offset"}


def test_every_module_is_small_and_says_what_it_owns():
    assert {p.stem for p in MODULES} == {"engine", "hooks", "outputs", "poc", "scheduling", "state", "worker"}
    for path in MODULES:
        text = path.read_text()
        assert len(text.splitlines()) < 600, path.name
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "May not" in doc and ("Owns" in doc or "owns" in doc), path.name


def test_only_the_engine_module_touches_transformers_internals():
    for path in MODULES:
        tree = ast.parse(path.read_text())
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imports |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        touched = attrs & PRIVATE_API - set(dir(CBInternals))  # CBInternals' own methods are the way in
        if path.stem == "engine":
            assert any(m.startswith("transformers") for m in imports) and touched
            continue
        assert not any(m.startswith("transformers") for m in imports), path.name
        assert not touched, (path.name, touched)


def test_public_names_unchanged():
    from cpoc_kernels.integrations import hf
    from cpoc_kernels.integrations.hf import ContinuousPoC, UnsupportedEngineError, cb_config
    from cpoc_kernels.integrations.hf.continuous import SUPPORTED_TRANSFORMERS, _CBInternals

    assert hf.ContinuousPoC is continuous.ContinuousPoC and SUPPORTED_TRANSFORMERS == "5.20–5.24"
    assert _CBInternals is CBInternals and issubclass(UnsupportedEngineError, RuntimeError) and callable(cb_config)
    for name in ("start", "stop", "wait", "detach", "stats", "artifacts", "exchange_rate", "chat_latencies",
                 "running", "failed", "error", "collected", "governor", "SMALL_POC_ROWS", "PROBE_EVERY"):
        assert hasattr(ContinuousPoC, name), name
