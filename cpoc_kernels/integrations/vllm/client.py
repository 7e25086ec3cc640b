"""Client side: submit nonces to an ``LLM`` / ``AsyncLLM`` as ordinary requests, collect their artifacts.

Artifacts are drained from the workers with ``collective_rpc("cpoc_drain", args=(keys,))``, each client taking
only the (round, nonce) keys it submitted, so clients sharing an engine do not take each other's records; every
TP rank computes the same rows, so records are merged per request id and checked to agree (a disagreement →
RuntimeError).
Admission for ``AsyncLLM`` is driven by the engine-independent :class:`~cpoc_kernels.governor.Governor`
(concurrency window on the client, as the spec recommends; the engine's scheduler stays stock).
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cpoc_kernels.artifacts import Artifact, check_nonce
from cpoc_kernels.governor import Governor, GovernorConfig, PoCBudget, StepLoad

from .requests import PoCRound, poc_request
from .seams import WORKER_EXTENSION

_request_counter = itertools.count()


class CpocNotReadyError(RuntimeError):
    """The engine cannot compute PoC nonces (worker extension or plugin missing in its workers)."""


@dataclass
class PoCResult:
    """Artifacts in the order of the submitted nonces (NaN nonces omitted, spec §5.4), plus what was refused."""

    artifacts: list[Artifact] = field(default_factory=list)
    nan_nonces: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)


def merge_worker_records(per_worker: Sequence[Sequence[dict]]) -> list[dict]:
    """One record per request id from the ranks' drains; ranks that disagree → RuntimeError."""
    merged: dict[str, dict] = {}
    for records in per_worker:
        for rec in records or ():
            rid = rec["request_id"]
            seen = merged.get(rid)
            if seen is None:
                merged[rid] = rec
            elif seen.get("vector_b64") != rec.get("vector_b64"):
                raise RuntimeError(f"cpoc: ranks disagree on request {rid}: {seen} vs {rec}")
    return list(merged.values())


def check_ready_results(results: Sequence[dict]) -> list[dict]:
    bad = [r for r in results if not (isinstance(r, dict) and r.get("registered") and r.get("attached"))]
    if bad or not results:
        raise CpocNotReadyError(f"cpoc is not active in every worker: {list(results)}; start vLLM with the cpoc "
                                f"general plugin installed and --worker-extension-cls {WORKER_EXTENSION}")
    if not any(r.get("has_logits_stage") for r in results):
        raise CpocNotReadyError(f"no worker holds the logits stage: {list(results)}")
    return list(results)


def _missing_extension(exc: Exception) -> CpocNotReadyError:
    return CpocNotReadyError(f"the engine's workers do not serve cpoc_ready ({type(exc).__name__}: {exc}); start vLLM "
                             f"with --worker-extension-cls {WORKER_EXTENSION} (LLM(worker_extension_cls=...))")


def _key(round: PoCRound, nonce: int) -> tuple:
    return (round.block_hash, round.public_key, round.seq_len, int(nonce))


def _drain_keys(wanted: set[tuple]) -> list[list]:
    """The ``cpoc_drain`` argument for ``wanted`` keys (msgpack-safe lists)."""
    return [list(key) for key in wanted]


def _collect(records: Iterable[dict], wanted: set[tuple], result: PoCResult) -> set[tuple]:
    """Move the records of ``wanted`` (round, nonce) keys into ``result``; return the keys seen.

    Records are matched by round and nonce (vLLM makes request ids unique internally, so the worker's
    ids are not the client's)."""
    done = set()
    for rec in records:
        key = (rec.get("block_hash"), rec.get("public_key"), rec.get("seq_len"), rec.get("nonce"))
        if key not in wanted or key in done:
            continue
        done.add(key)
        nonce = rec["nonce"]
        if rec.get("vector_b64"):
            result.artifacts.append(Artifact(nonce, rec["vector_b64"]))
        elif (rec.get("error") or "").startswith("NaN"):
            result.nan_nonces.append(nonce)
        else:
            result.refused[nonce] = rec.get("error") or "unknown"
    return done


def _unique(nonces: Iterable[int]) -> list[int]:
    nonces = [check_nonce(n) for n in nonces]
    if len(set(nonces)) != len(nonces):
        raise ValueError("duplicate nonces in one submission")
    return nonces


def _sort(result: PoCResult, nonces: Sequence[int]) -> PoCResult:
    rank = {n: i for i, n in enumerate(nonces)}
    result.artifacts.sort(key=lambda a: rank[a.nonce])
    return result


class CpocLLM:
    """Continuous PoC on a synchronous ``vllm.LLM`` started with the cpoc worker extension."""

    def __init__(self, llm, check: bool = True):
        self.llm = llm
        self.workers = self.check_ready() if check else []

    def check_ready(self) -> list[dict]:
        try:
            results = self.llm.collective_rpc("cpoc_ready")
        except Exception as exc:  # noqa: BLE001 - any failure here means the extension is not there
            raise _missing_extension(exc) from exc
        return check_ready_results(results)

    def drain(self, keys: Iterable[tuple] | None = None) -> list[dict]:
        """Records from the workers: those of ``keys`` ((block_hash, public_key, seq_len, nonce)), or all."""
        args = () if keys is None else (_drain_keys(set(keys)),)
        return merge_worker_records(self.llm.collective_rpc("cpoc_drain", args=args))

    def stats(self) -> list[dict]:
        return self.llm.collective_rpc("cpoc_stats")

    def generate(self, chat_prompts: Sequence = (), chat_params=None, round: PoCRound | None = None,
                 nonces: Sequence[int] = (), poc_priority: int | None = None, use_tqdm: bool = False):
        """One ``LLM.generate`` call with chat and PoC requests mixed (vLLM schedules them, chunked prefill
        included). Returns ``(chat outputs in order, PoCResult)``. ``poc_priority`` (with
        ``--scheduling-policy priority``): PoC's priority value, chat gets 0 (lower value = served first)."""
        nonces = _unique(nonces)
        if nonces and round is None:
            raise ValueError("nonces need a round")
        chat_prompts = list(chat_prompts)
        if chat_params is None or not isinstance(chat_params, (list, tuple)):
            if chat_params is None and chat_prompts:
                raise ValueError("chat prompts need sampling params")
            chat_params = [chat_params] * len(chat_prompts)
        specs = [poc_request(round, n).to_vllm() for n in nonces]
        prompts = chat_prompts + [p for p, _ in specs]
        params = list(chat_params) + [s for _, s in specs]
        kwargs = {}
        if poc_priority is not None:
            kwargs["priority"] = [0] * len(chat_prompts) + [poc_priority] * len(specs)
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm, **kwargs) if prompts else []
        chat_out = outputs[: len(chat_prompts)]  # PoC outputs carry nothing: artifacts come from the workers
        result = PoCResult()
        if nonces:
            wanted = {_key(round, n) for n in nonces}
            for key in wanted - _collect(self.drain(wanted), wanted, result):
                result.refused[key[3]] = "no artifact returned by the workers"
            _sort(result, nonces)
        return chat_out, result

    def compute(self, round: PoCRound, nonces: Sequence[int]) -> PoCResult:
        """Validation mode: a PoC-only batch of ``nonces`` through the engine; artifacts via ``collective_rpc``."""
        return self.generate(round=round, nonces=nonces)[1]


class PoCAdmission:
    """How many new nonces to submit now, from the workers' step log and the :class:`Governor`."""

    def __init__(self, config: GovernorConfig):
        self.governor = Governor(config)
        self._seen_steps = 0
        self.last_load: StepLoad | None = None
        self.last_budget: PoCBudget | None = None

    def observe(self, stats: dict, unseen_requests: int = 0) -> StepLoad:
        """Feed new steps of a worker's ``cpoc_stats`` to the governor; return the latest load.

        ``unseen_requests``: PoC requests submitted that the workers do not hold yet (waiting in vLLM's
        scheduler); each still needs all its ``poc_seq_len`` prefill tokens. KV: every PoC request in flight
        ends up holding ``poc_seq_len`` tokens (chat's own KV use is not visible here; the governor's
        ``kv_reserve_fraction`` keeps room for it)."""
        steps = stats.get("recent_steps", [])
        total = stats.get("steps", 0)
        fresh = steps[-max(0, min(len(steps), total - self._seen_steps)):] if total > self._seen_steps else []
        self._seen_steps = total
        for step in fresh:
            if step["seconds_since_previous"] > 0:
                self.governor.observe(step["rows"], step["poc_rows"], step["seconds_since_previous"])
        last = steps[-1] if steps else {"rows": 0, "poc_rows": 0}
        cfg = self.governor.config
        unseen = max(0, int(unseen_requests))
        pending = int(stats.get("pending_tokens", 0)) + unseen * cfg.poc_seq_len
        poc_kv = (int(stats.get("in_flight", 0)) + unseen) * cfg.poc_seq_len
        return StepLoad(chat_tokens=last["rows"] - last["poc_rows"],
                        kv_tokens_free=max(0, cfg.kv_tokens_capacity - poc_kv), poc_tokens_pending=pending)

    def admit(self, stats: dict, unseen_requests: int = 0) -> int:
        """New PoC requests to submit now (the governor's decision on the load from ``stats``)."""
        self.last_load = self.observe(stats, unseen_requests)
        budget = self.last_budget = self.governor.decide(self.last_load)
        self.governor.record(budget)
        return budget.new_requests


class AsyncCpoc:
    """Continuous PoC on a ``vllm.v1.engine.async_llm.AsyncLLM`` (chat is submitted by whoever serves it).

    Also works on any vLLM ``EngineClient`` (e.g. the one ``vllm serve``'s API server holds): it only uses
    ``generate`` and ``collective_rpc``."""

    def __init__(self, engine):
        self.engine = engine

    async def check_ready(self) -> list[dict]:
        try:
            results = await self.engine.collective_rpc("cpoc_ready")
        except Exception as exc:  # noqa: BLE001
            raise _missing_extension(exc) from exc
        return check_ready_results(results)

    async def stats(self) -> dict:
        """The first worker's ``cpoc_stats`` (step log, in-flight PoC tokens, counters)."""
        return (await self.engine.collective_rpc("cpoc_stats"))[0]

    async def _drain(self, wanted: set[tuple]) -> list[dict]:
        if not wanted:
            return []
        return merge_worker_records(await self.engine.collective_rpc("cpoc_drain", args=(_drain_keys(wanted),)))

    async def _one(self, round: PoCRound, nonce: int, request_id: str) -> None:
        prompt, params = poc_request(round, nonce).to_vllm()
        async for _ in self.engine.generate(prompt, params, request_id):
            pass

    async def stream(self, round: PoCRound, nonces: Iterator[int], on_result: Callable[[PoCResult, int], None],
                     admission: PoCAdmission | None = None, max_in_flight: int = 64, poll_seconds: float = 0.05,
                     stop: asyncio.Event | None = None) -> None:
        """Compute nonces pulled from ``nonces`` (in order; each submitted as its own request) until the
        iterator ends or ``stop`` is set, then finish the ones in flight and return.

        At most ``max_in_flight`` at once, and as many new ones per poll as ``admission`` (the governor)
        allows — at least one while none runs. Results go to ``on_result(result, n_done)`` as they arrive
        (``n_done`` nonces finished: artifacts, NaN-dropped and refused ones). Cancelling the awaiting task
        aborts the requests in flight (nothing more is reported for them)."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        pending: dict[asyncio.Task, tuple] = {}
        seen: set[tuple] = set()
        finished_keys: set[tuple] = set()  # requests done, their records not collected yet
        exhausted = False
        try:
            while True:
                pulling = not exhausted and not (stop is not None and stop.is_set())
                room = max_in_flight - len(pending) if pulling else 0
                if room > 0 and admission is not None:
                    stats = await self.stats()
                    unseen = max(0, len(pending) - int(stats.get("in_flight", 0)))
                    room = min(room, max(admission.admit(stats, unseen), 0 if pending else 1))
                for _ in range(room):
                    try:
                        nonce = check_nonce(next(nonces))
                    except StopIteration:
                        exhausted = True
                        break
                    key = _key(round, nonce)
                    if key in seen:
                        raise ValueError(f"nonce {nonce} was submitted twice in one stream")
                    seen.add(key)
                    rid = f"cpoc-{next(_request_counter)}-n{nonce}"
                    pending[asyncio.ensure_future(self._one(round, nonce, rid))] = key
                if not pending and not finished_keys:
                    if not pulling or exhausted:
                        break
                    await asyncio.sleep(poll_seconds)
                    continue
                if pending:
                    done, _ = await asyncio.wait(pending, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        finished_keys.add(pending.pop(task))
                        task.result()
                if finished_keys:
                    result = PoCResult()
                    got = _collect(await self._drain(finished_keys), finished_keys, result)
                    finished_keys -= got
                    if not pending and finished_keys:  # finished but never read out: say so, do not wait forever
                        for key in finished_keys:
                            result.refused[key[3]] = "no artifact returned by the workers"
                        got |= finished_keys
                        finished_keys = set()
                    if got:
                        on_result(result, len(got))
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def run(self, round: PoCRound, nonces: Sequence[int], admission: PoCAdmission | None = None,
                  max_in_flight: int = 64, poll_seconds: float = 0.05) -> PoCResult:
        """Compute ``nonces``, admitting new ones as the governor allows (all at once without ``admission``,
        bounded by ``max_in_flight``). Returns artifacts in nonce order."""
        nonces = _unique(nonces)
        total = PoCResult()

        def gather(part: PoCResult, _n_done: int) -> None:
            total.artifacts.extend(part.artifacts)
            total.nan_nonces.extend(part.nan_nonces)
            total.refused.update(part.refused)

        await self.stream(round, iter(nonces), gather, admission=admission, max_in_flight=max_in_flight,
                          poll_seconds=poll_seconds)
        return _sort(total, nonces)
