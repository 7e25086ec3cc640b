"""The output router filter: PoC requests' outputs never reach the chat output queue or handlers.

Owns: wrapping the router's ``deliver`` / ``deliver_batch`` (installed by ``CBInternals.wrap_manager``), retiring
finished PoC requests from the tracker (an engine-side PoC error fails PoC), and the chat statistics taken from
finished chat outputs (latency window, (prompt, output) length histogram for the cost model).

May not: change or drop a chat output, or reach the engine beyond the output objects it is handed (``request_id``,
``is_finished()``, ``error``, ``created_time``, ``prompt_ids``, ``generated_tokens``: transformers' public
``GenerationOutput``).
"""
from __future__ import annotations

import time

from .state import PoCFailure, SharedState


class OutputFilter:
    def __init__(self, shared: SharedState):
        self.shared = shared

    def is_poc_output(self, output) -> bool:
        rid = getattr(output, "request_id", None)
        return isinstance(rid, str) and rid.startswith(self.shared.prefix + "-")

    def _on_poc_output(self, output) -> None:
        sh = self.shared
        sh.counters["poc_outputs_filtered"] += 1
        tracker = sh.tracker
        if tracker is not None and output.is_finished():
            state = tracker.finish(output.request_id)
            if state is not None and not state.done and sh.failed is None and getattr(output, "error", None):
                sh.fail(PoCFailure(f"PoC request {output.request_id} failed: {output.error}"), "engine")

    def _on_chat_output(self, output) -> None:
        sh = self.shared
        try:
            if output.is_finished() and getattr(output, "error", None) is None:
                now = time.perf_counter()
                sh.latencies.append(now - output.created_time)
                sh.counters["chat_requests_done"] += 1
                key = (max(1, len(output.prompt_ids)), max(1, len(output.generated_tokens)))
                sh.chat_shapes[key] = sh.chat_shapes.get(key, 0) + 1
        except Exception:  # noqa: BLE001 - stats only
            pass

    def wrap_deliver(self, original):
        def deliver(output):
            if self.is_poc_output(output):
                self._on_poc_output(output)
                return None
            self._on_chat_output(output)
            return original(output)

        return deliver

    def wrap_deliver_batch(self, original):
        def deliver_batch(outputs):
            chat = []
            for out in outputs:
                if self.is_poc_output(out):
                    self._on_poc_output(out)
                else:
                    self._on_chat_output(out)
                    chat.append(out)
            if chat:
                return original(chat)
            return None

        return deliver_batch
