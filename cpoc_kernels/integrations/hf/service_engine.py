"""HF transformers engine for the PoC service: one continuous-batching manager serves chat completions, and
:class:`ContinuousPoC` (governor ``fill`` by default) computes mining nonces and validation recomputes in the
same forward steps, beside chat (chat is never paused or refused).

Sampling: the manager samples (``do_sample=True``) with per-request temperature / top-k / top-p; a greedy request
is sent as ``top_k=1`` (only the argmax token keeps probability mass, so the draw is the argmax). Uses only the
public API of :mod:`cpoc_kernels.integrations.hf`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.integrations.hf import ContinuousPoC, cb_config
from cpoc_kernels.service.engine import EmitFn, EngineAdapter, EngineLoad, RoundSpec

logger = logging.getLogger("cpoc_kernels.hf.service")


@dataclass(frozen=True)
class EngineSettings:
    """Sizes of the continuous-batching engine (set explicitly: needed on CPU) and the governor."""

    max_batch_tokens: int = 256
    num_blocks: int = 512
    page_size: int = 16
    max_requests_per_batch: int = 32
    governor: str = "fill"
    slo_overhead: float = 0.05

    def __post_init__(self):
        for name in ("max_batch_tokens", "num_blocks", "page_size", "max_requests_per_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.governor not in ("fill", "fixed-share", "off"):
            raise ValueError(f"governor must be fill, fixed-share or off, got {self.governor!r}")
        if not self.slo_overhead > 0:
            raise ValueError("slo_overhead must be positive")

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.page_size


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"


class CompletionError(ValueError):
    """A completion request this engine cannot serve (→ HTTP 400)."""


class HFEngine(EngineAdapter):
    """An HF causal LM (decoder layers at ``model.model.layers``) behind continuous batching + continuous PoC."""

    validation_beside_inference = True  # recomputes ride the chat engine; chat outputs are untouched (tests)

    def __init__(self, model: torch.nn.Module, model_names: Sequence[str], settings: EngineSettings | None = None):
        from transformers import GenerationConfig

        if not model_names:
            raise ValueError("need at least one served model name")
        self.model, self._names = model, list(dict.fromkeys(model_names))
        self.settings = settings or EngineSettings()
        cfg = model.config
        eos = getattr(cfg, "eos_token_id", None)
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.vocab_size = int(cfg.vocab_size)
        self.hidden = int(cfg.hidden_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        # temperature/top-k/top-p defaults that are not neutral, so their per-request processors exist
        gen = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=50, top_p=0.95,
                               eos_token_id=self.eos_ids or -1, pad_token_id=0)
        s = self.settings
        self.manager = model.init_continuous_batching(
            generation_config=gen,
            continuous_batching_config=cb_config(max_batch_tokens=s.max_batch_tokens, num_blocks=s.num_blocks,
                                                 page_size=s.page_size, max_requests_per_batch=s.max_requests_per_batch,
                                                 per_request_processors=True))
        self.poc = ContinuousPoC(model, self.manager, mode=s.governor, slo_overhead=s.slo_overhead,
                                 on_artifact=self._on_artifact)
        self._sink_lock = threading.Lock()
        self._sink = None  # where artifacts of the current PoC round go
        self._ids = itertools.count()
        self._chat_running = 0
        self._chat_done = 0
        self._last_decisions: dict = {}
        self._last_reason: str | None = None
        self._mining = False
        self._closed = False

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.manager.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.poc.stop(drain=False, timeout=5)
        finally:
            self.manager.stop(block=True, timeout=30)
            self.poc.detach()

    @property
    def model_names(self) -> Sequence[str]:
        return self._names

    def version_info(self) -> dict:
        import transformers

        return {"engine": "hf-transformers-continuous-batching", "transformers_version": transformers.__version__}

    # ----------------------------------------------------------------------------- PoC
    def _on_artifact(self, artifact: Artifact) -> None:
        with self._sink_lock:
            sink = self._sink
        if sink is not None:
            sink(artifact)

    def check_round(self, round: RoundSpec) -> None:
        if not 0 < round.k_dim <= self.hidden:
            raise ValueError(f"k_dim must be in 1..{self.hidden} (the model's hidden size), got {round.k_dim}")
        if round.seq_len > self.settings.kv_tokens:
            raise ValueError(f"seq_len {round.seq_len} exceeds this engine's KV capacity ({self.settings.kv_tokens} "
                             "tokens; raise --num-blocks)")
        if round.seq_len > self.max_positions:
            raise ValueError(f"seq_len {round.seq_len} exceeds the model's {self.max_positions} positions")

    def _begin(self, round: RoundSpec, nonces, sink) -> None:
        with self._sink_lock:
            self._sink = sink
        self.poc.start(round.block_hash, round.public_key, nonces, round.seq_len, k=round.k_dim,
                       stronger_rng=round.stronger_rng)

    async def _end(self, drain_seconds: float) -> None:
        # always drain: no readout of this round may still be pending when the next round starts
        await asyncio.to_thread(self.poc.stop, True, drain_seconds)
        with self._sink_lock:
            self._sink = None

    async def start_mining(self, round: RoundSpec, nonces: Iterator[int], emit: EmitFn) -> None:
        self._mining = True
        self._begin(round, nonces, lambda art: emit((art,), 1))

    async def stop_mining(self, drain_seconds: float = 5.0) -> None:
        if self._mining:
            self._mining = False
            await self._end(drain_seconds)

    def mining_error(self) -> str | None:
        return self.poc.stats()["error"] if self._mining and self.poc.failed else None

    async def compute(self, round: RoundSpec, nonces: Sequence[int]) -> list[Artifact]:
        got: dict[int, Artifact] = {}
        nonces = list(nonces)
        # done = every nonce read out (NaN ones included): ContinuousPoC's cumulative nonces_done counter. (Its
        # wait() without a count can return while the last nonces' inputs are still being prepared.)
        goal = self.poc.stats()["nonces_done"] + len(nonces)
        self._begin(round, iter(nonces), lambda art: got.__setitem__(art.nonce, art))
        try:
            while not self.poc.wait(nonces=goal, timeout=0):
                if self.poc.failed:
                    raise RuntimeError(f"PoC compute failed: {self.poc.stats()['error']}")
                await asyncio.sleep(0.01)
            if self.poc.failed:
                raise RuntimeError(f"PoC compute failed: {self.poc.stats()['error']}")
        finally:  # also when cancelled: in-flight nonces finish (a few steps), the rest is never admitted
            await asyncio.shield(self._end(5.0))
        return [got[n] for n in nonces if n in got]

    def load(self) -> EngineLoad:
        st = self.poc.stats()
        gov = st.get("governor") or {}
        decisions = dict(gov.get("decisions") or {})
        grown = {k: v - self._last_decisions.get(k, 0) for k, v in decisions.items()}
        grown = {k: v for k, v in grown.items() if v > 0}
        if grown:
            self._last_reason = max(grown, key=grown.get)
        self._last_decisions = decisions
        return EngineLoad(
            chat_requests_running=self._chat_running,
            poc_token_share=st.get("poc_token_share"),
            governor_reason=gov.get("stopped_reason") or self._last_reason,
            nonces_dropped_nan=st.get("nonces_dropped_nan"),
            details={"chat_requests_done": self._chat_done, "nonces_done": st.get("nonces_done"),
                     "nonces_per_s": st.get("nonces_per_s"), "in_flight": st.get("in_flight"),
                     "chat_latency_s": st.get("chat_latency_s"), "governor_mode": self.settings.governor,
                     "poc_failed": st.get("failed"), "poc_error": st.get("error")})

    # ----------------------------------------------------------------------------- chat
    def check_completion(self, prompt: Sequence[int], max_tokens: int) -> None:
        if not prompt:
            raise CompletionError("prompt must hold at least one token id")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise CompletionError(f"token ids must be integers in [0, {self.vocab_size}); got {bad[:3]}")
        if max_tokens < 1:
            raise CompletionError("max_tokens must be >= 1")
        total = len(prompt) + max_tokens
        limit = min(self.max_positions, self.settings.kv_tokens)
        if total > limit:
            raise CompletionError(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds this engine's "
                                  f"{limit} tokens")

    async def complete(self, prompt: Sequence[int], max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                       top_k: int = 0, stop_at_eos: bool = True) -> Completion:
        """Generate up to ``max_tokens`` after ``prompt`` (token ids). ``temperature == 0``: greedy."""
        self.check_completion(prompt, max_tokens)
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise CompletionError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if temperature == 0:
            kwargs = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            kwargs = {"temperature": float(temperature), "top_k": int(top_k) or self.vocab_size, "top_p": float(top_p)}
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        rid = f"chat-{next(self._ids)}"

        def on_result(output):
            if output.is_finished() and not done.done():
                done.set_result(output)

        self.manager.register_result_handler(rid, on_result)
        eos = self.eos_ids if (stop_at_eos and self.eos_ids) else -1
        self._chat_running += 1
        try:
            accepted = self.manager.add_request(list(prompt), request_id=rid, max_new_tokens=max_tokens,
                                                eos_token_id=eos, **kwargs)
            if accepted is None:
                raise RuntimeError("the engine does not accept requests (stopping?)")
            output = await done
        except asyncio.CancelledError:
            self.manager.cancel_request(rid)
            raise
        finally:
            self._chat_running -= 1
        if getattr(output, "error", None):
            raise RuntimeError(f"generation failed: {output.error}")
        tokens = [int(t) for t in output.generated_tokens]
        self._chat_done += 1
        finish = "stop" if (self.eos_ids and stop_at_eos and tokens and tokens[-1] in self.eos_ids
                            and len(tokens) < max_tokens) else "length"
        return Completion(tokens, finish)
