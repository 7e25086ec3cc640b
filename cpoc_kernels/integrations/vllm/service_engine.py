"""vLLM engine for the PoC service: mining and validation nonces go to the running engine as ordinary
requests through :class:`~cpoc_kernels.integrations.vllm.client.AsyncCpoc`, admitted by the governor
(:class:`~cpoc_kernels.integrations.vllm.client.PoCAdmission`), beside whatever chat the API server is serving
(chat is never paused or refused; vLLM's own scheduler mixes both).

Needs an engine started with the cpoc worker extension (``--worker-extension-cls``) and the ``cpoc`` general
plugin loaded in its workers; :meth:`VllmEngine.check_ready` says so otherwise. Everything runs on the API
server's event loop and only awaits the engine (no blocking call): ``/health`` keeps answering.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.governor import GovernorConfig
from cpoc_kernels.service.engine import EmitFn, EngineAdapter, EngineLoad, RoundSpec

from .client import AsyncCpoc, PoCAdmission, PoCResult
from .requests import PoCRequestError, PoCRound

logger = logging.getLogger("cpoc_kernels.vllm.service")


class VllmEngine(EngineAdapter):
    """A vLLM ``EngineClient`` (``AsyncLLM``) as the PoC service's engine.

    ``max_batch_tokens`` / ``kv_tokens`` / ``max_num_seqs`` / ``max_model_len`` / ``hidden_size``: the engine's
    sizes (:meth:`from_engine_client` reads them from its ``vllm_config``). PoC requests in flight are capped
    at half of ``max_num_seqs`` so that chat always finds sequence slots.
    """

    validation_beside_inference = True  # recomputes are ordinary requests next to chat; chat outputs unchanged

    def __init__(self, engine_client, model_names: Sequence[str], *, max_batch_tokens: int, kv_tokens: int,
                 max_num_seqs: int, max_model_len: int, hidden_size: int, governor_mode: str = "fill",
                 poll_seconds: float = 0.05):
        if not model_names:
            raise ValueError("need at least one served model name")
        self.cpoc = AsyncCpoc(engine_client)
        self._names = list(dict.fromkeys(model_names))
        self.max_batch_tokens, self.kv_tokens = int(max_batch_tokens), int(kv_tokens)
        self.max_num_seqs, self.max_model_len, self.hidden = int(max_num_seqs), int(max_model_len), int(hidden_size)
        self.max_in_flight = max(1, self.max_num_seqs // 2)
        self.governor_mode, self.poll_seconds = governor_mode, poll_seconds
        self._admission: PoCAdmission | None = None
        self._mining: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._error: str | None = None
        self.counters = {"nonces_done": 0, "artifacts": 0, "nan_dropped": 0, "refused": 0}
        self.last_refusal: str | None = None
        self.workers: list[dict] = []

    @classmethod
    def from_engine_client(cls, engine_client, model_names: Sequence[str], **kwargs) -> "VllmEngine":
        """Sizes from the engine's ``vllm_config`` (KV capacity: the engine's block count when the frontend knows
        it, else ``max_num_seqs × max_model_len``)."""
        cfg = engine_client.vllm_config
        sched, cache, model = cfg.scheduler_config, cfg.cache_config, cfg.model_config
        blocks = getattr(cache, "num_gpu_blocks", None)
        max_len = int(model.max_model_len)
        kv = int(blocks) * int(cache.block_size) if blocks else int(sched.max_num_seqs) * max_len
        text = getattr(model.hf_config, "get_text_config", lambda: model.hf_config)()
        return cls(engine_client, model_names, max_batch_tokens=sched.max_num_batched_tokens, kv_tokens=kv,
                   max_num_seqs=sched.max_num_seqs, max_model_len=max_len, hidden_size=text.hidden_size, **kwargs)

    async def check_ready(self) -> list[dict]:
        """The workers' cpoc status; :class:`~cpoc_kernels.integrations.vllm.client.CpocNotReadyError` if PoC
        cannot run in this engine."""
        self.workers = await self.cpoc.check_ready()
        return self.workers

    @property
    def model_names(self) -> Sequence[str]:
        return self._names

    def version_info(self) -> dict:
        try:
            from .version import installed_vllm_version

            version = installed_vllm_version()
        except ImportError:  # an engine client without vLLM installed (tests' fake engines)
            version = None
        return {"engine": "vllm", "vllm_version": version}

    # ----------------------------------------------------------------------------- rounds
    def _round(self, spec: RoundSpec) -> PoCRound:
        return PoCRound(spec.block_hash, spec.public_key, spec.seq_len, spec.k_dim, spec.stronger_rng,
                        model=self._names[0])

    def check_round(self, round: RoundSpec) -> None:
        if not 2 <= round.k_dim <= self.hidden:
            raise ValueError(f"k_dim must be in 2..{self.hidden} (the model's hidden size), got {round.k_dim}")
        if round.seq_len + 1 > self.max_model_len:
            raise ValueError(f"seq_len {round.seq_len} does not fit this engine's max_model_len "
                             f"{self.max_model_len} (a PoC request holds seq_len + 1 tokens)")
        if round.seq_len > self.kv_tokens:
            raise ValueError(f"seq_len {round.seq_len} exceeds this engine's KV capacity ({self.kv_tokens} tokens)")
        try:
            self._round(round)
        except PoCRequestError as exc:
            raise ValueError(str(exc)) from None

    def _new_admission(self, spec: RoundSpec) -> PoCAdmission:
        self._admission = PoCAdmission(GovernorConfig(max_batch_tokens=self.max_batch_tokens,
                                                      kv_tokens_capacity=self.kv_tokens, mode=self.governor_mode,
                                                      poc_seq_len=spec.seq_len))
        return self._admission

    def _count(self, result: PoCResult, n_done: int) -> None:
        self.counters["nonces_done"] += n_done
        self.counters["artifacts"] += len(result.artifacts)
        self.counters["nan_dropped"] += len(result.nan_nonces)
        self.counters["refused"] += len(result.refused)
        if result.refused:
            nonce, reason = next(iter(result.refused.items()))
            self.last_refusal = f"nonce {nonce}: {reason}"
            logger.warning("cpoc: %d nonce(s) refused by the workers, e.g. %s", len(result.refused), self.last_refusal)

    # ----------------------------------------------------------------------------- mining
    async def start_mining(self, round: RoundSpec, nonces: Iterator[int], emit: EmitFn) -> None:
        if self._mining is not None and not self._mining.done():
            raise RuntimeError("mining is already running")
        self._error = None
        self._stop = asyncio.Event()
        admission, stop = self._new_admission(round), self._stop

        def deliver(result: PoCResult, n_done: int) -> None:
            self._count(result, n_done)
            emit(result.artifacts, n_done)  # also while stop_mining drains; never after it returned

        async def mine() -> None:
            try:
                await self.cpoc.stream(self._round(round), nonces, deliver, admission=admission,
                                       max_in_flight=self.max_in_flight, poll_seconds=self.poll_seconds, stop=stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported through mining_error()
                logger.exception("cpoc: mining failed")
                self._error = f"{type(exc).__name__}: {exc}"

        self._mining = asyncio.get_running_loop().create_task(mine(), name="cpoc-vllm-mining")

    async def stop_mining(self, drain_seconds: float = 5.0) -> None:
        task, self._mining = self._mining, None
        if task is None:
            return
        self._stop.set()
        done, _ = await asyncio.wait({task}, timeout=max(0.0, drain_seconds))
        if not done:  # in-flight nonces did not finish in time: abort their requests
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def mining_error(self) -> str | None:
        return self._error

    # ----------------------------------------------------------------------------- validation / /generate
    async def compute(self, round: RoundSpec, nonces: Sequence[int]) -> list[Artifact]:
        result = await self.cpoc.run(self._round(round), nonces, admission=self._new_admission(round),
                                     max_in_flight=self.max_in_flight, poll_seconds=self.poll_seconds)
        self._count(result, len(result.artifacts) + len(result.nan_nonces) + len(result.refused))
        return result.artifacts

    # ----------------------------------------------------------------------------- /status
    def load(self) -> EngineLoad:
        admission = self._admission
        gov = admission.governor.stats() if admission is not None else {}
        last = admission.last_budget if admission is not None else None
        return EngineLoad(
            poc_token_share=gov.get("poc_token_share"),
            governor_reason=gov.get("stopped_reason") or (last.reason.value if last is not None else None),
            nonces_dropped_nan=self.counters["nan_dropped"],
            details={**self.counters, "last_refusal": self.last_refusal, "max_in_flight": self.max_in_flight,
                     "max_batch_tokens": self.max_batch_tokens, "kv_tokens": self.kv_tokens,
                     "governor_mode": self.governor_mode, "governor_decisions": gov.get("decisions"),
                     "chat_tokens_observed": gov.get("chat_tokens"), "poc_tokens_observed": gov.get("poc_tokens"),
                     "last_step_chat_tokens": admission.last_load.chat_tokens
                     if admission is not None and admission.last_load is not None else None})
