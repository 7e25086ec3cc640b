"""The seam between the PoC service core and an inference engine (HF continuous batching, vLLM).

The service core (state machine, nonce partition, callbacks, validation jobs) knows no engine; it drives an
:class:`EngineAdapter`. An adapter only has to do three things with PoC nonces:

* **mine**: pull nonces from an iterator (in order, as its admission policy allows) and compute them beside
  chat, handing each finished batch back through an ``emit`` callback;
* **compute**: recompute a given list of nonces (validation jobs, ``/generate``), beside chat;
* report its **load** (chat, PoC share, governor reason) for ``/status``.

The core never runs mining and a compute at the same time (validation waits for mining to end, as in the
network's backend), so an adapter may assume one PoC round at a time.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from cpoc_kernels.artifacts import Artifact

EmitFn = Callable[[Sequence[Artifact], int], None]
"""``emit(artifacts, n_done)``: ``artifacts`` finished (finite, NaN nonces already dropped); ``n_done`` nonces
were consumed for them (``n_done >= len(artifacts)``; the difference is the NaN-dropped ones). Thread-safe,
never blocks: an adapter may call it from any thread."""


@dataclass(frozen=True)
class RoundSpec:
    """Everything that fixes a nonce's artifact except the nonce and the model (spec §5)."""

    block_hash: str
    public_key: str
    seq_len: int
    k_dim: int = 12
    stronger_rng: bool = False
    batch_size: int = 32
    """Nonces per batch: a hint for adapters that compute in batches (the reference's chunking)."""


@dataclass
class EngineLoad:
    """What the engine reports for ``/status`` right now (all optional: ``None`` = not known)."""

    chat_requests_running: int | None = None
    """Chat requests admitted and not finished."""
    chat_tokens_per_second: float | None = None
    poc_token_share: float | None = None
    """Share of the engine's forward tokens that were PoC rows (this round), 0..1."""
    governor_reason: str | None = None
    """Why the governor chose the last PoC budget (``BudgetReason`` value or free text)."""
    nonces_dropped_nan: int | None = None
    details: dict = field(default_factory=dict)
    """Engine-specific extras (JSON-serializable), shown under ``/status`` ``cpoc.engine.details``."""

    def to_json(self) -> dict:
        return {
            "chat_requests_running": self.chat_requests_running,
            "chat_tokens_per_second": self.chat_tokens_per_second,
            "poc_token_share": self.poc_token_share,
            "governor_reason": self.governor_reason,
            "nonces_dropped_nan": self.nonces_dropped_nan,
            "details": self.details,
        }


class EngineAdapter(abc.ABC):
    """One inference engine as the PoC service sees it. Methods are called from the service's event loop."""

    #: ``GET /api/v1/pow/versions`` ``poc_validation_inference``: True only where :meth:`compute` runs beside
    #: live inference without touching it (chat keeps being served, its outputs unchanged).
    validation_beside_inference: bool = False

    @property
    @abc.abstractmethod
    def model_names(self) -> Sequence[str]:
        """Names ``params.model`` may carry (the served model path and its aliases); others → 409."""

    def check_round(self, round: RoundSpec) -> None:
        """Raise ``ValueError`` (→ HTTP 422) if this engine cannot compute ``round`` (e.g. ``k_dim > hidden``)."""

    @abc.abstractmethod
    async def start_mining(self, round: RoundSpec, nonces: Iterator[int], emit: EmitFn) -> None:
        """Begin computing nonces pulled from ``nonces`` (in order, densely) beside chat; return at once.

        Artifacts go to ``emit`` as they finish. The iterator ends only at the int32 bound. Errors the engine
        cannot recover from should make :meth:`mining_error` non-None (the service then reports them)."""

    @abc.abstractmethod
    async def stop_mining(self, drain_seconds: float = 5.0) -> None:
        """Stop pulling nonces. Nonces in flight are finished (and emitted) for up to ``drain_seconds``, then
        cancelled. After this returns ``emit`` is never called again for the round. Idempotent."""

    def mining_error(self) -> str | None:
        """Why mining stopped on its own (engine failure), or None."""
        return None

    @abc.abstractmethod
    async def compute(self, round: RoundSpec, nonces: Sequence[int]) -> list[Artifact]:
        """Artifacts of ``nonces`` (validation / ``/generate``), computed beside chat, in nonce order; nonces
        whose hidden state is not finite are omitted (spec §5.4). Cancelling the awaiting task abandons the
        computation (no artifact of it is returned)."""

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """Chat load, PoC token share and governor reason now (cheap; called on every ``/status``)."""

    def version_info(self) -> dict:
        """Extra fields for ``GET /api/v1/pow/versions`` (engine name and version)."""
        return {}


class BatchedEngineAdapter(EngineAdapter):
    """An adapter whose mining is the reference's loop over :meth:`compute`: take ``round.batch_size`` nonces from
    the partition, compute them (beside chat), emit, repeat. Engines that compute a given list of nonces with their
    own admission (e.g. vLLM's ``AsyncCpoc.run``) only implement :meth:`compute`, :meth:`load` and
    :attr:`model_names`. A failing batch is retried with the same nonces after ``retry_seconds`` (the partition
    stays dense); ``max_consecutive_failures`` failures in a row end the round (:meth:`mining_error`)."""

    retry_seconds: float = 0.1
    max_consecutive_failures: int = 10

    _mining_task = None
    _mining_stop = None
    _mining_error: str | None = None

    async def start_mining(self, round: RoundSpec, nonces: Iterator[int], emit: EmitFn) -> None:
        import asyncio

        self._mining_error = None
        self._mining_stop = asyncio.Event()
        self._mining_task = asyncio.get_running_loop().create_task(self._mine_batches(round, nonces, emit))

    async def _mine_batches(self, round: RoundSpec, nonces: Iterator[int], emit: EmitFn) -> None:
        import asyncio
        import itertools

        failures = 0
        batch: list[int] = []
        while not self._mining_stop.is_set():
            batch = batch or list(itertools.islice(nonces, round.batch_size))
            if not batch:
                return  # the partition reached the int32 bound
            try:
                artifacts = await self.compute(round, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried, then reported
                failures += 1
                if failures >= self.max_consecutive_failures:
                    self._mining_error = f"{type(exc).__name__}: {exc}"
                    return
                await asyncio.sleep(self.retry_seconds)
                continue
            failures = 0
            emit(artifacts, len(batch))
            batch = []

    async def stop_mining(self, drain_seconds: float = 5.0) -> None:
        import asyncio

        task, self._mining_task = self._mining_task, None
        if task is None:
            return
        self._mining_stop.set()  # the batch being computed finishes and is emitted (up to drain_seconds)
        try:
            await asyncio.wait_for(asyncio.shield(task), drain_seconds)
        except asyncio.TimeoutError:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def mining_error(self) -> str | None:
        return self._mining_error
