"""What happens off the engine thread: the PoC worker thread.

Owns: the worker thread and its job loop — input embeddings of the next nonces (``prepared``, refilled up to the
round's prefetch depth), the output stage of finished nonces (readout → :class:`~cpoc_kernels.artifacts.Artifact`,
merged over queued jobs), and feeding the governor's step-time fit (``observe`` jobs).

May not: touch the engine's scheduler or the model's forward (it only wakes the engine loop), nor decide admission;
the readout may also be called on the engine thread by the hooks (PoC-only CPU steps).
"""
from __future__ import annotations

import queue
import threading

import torch

from cpoc_kernels import ops
from cpoc_kernels.artifacts import Artifact, check_nonce

from ..runner import readout_vectors
from .state import SharedState

REFILL_CHUNK = 16  # nonces whose inputs one refill prepares at most (one op call)


def poc_input_embeddings(block_hash: str, public_key: str, nonces: list[int], seq_len: int, hidden: int,
                         dtype: torch.dtype, device: torch.device, stronger_rng: bool) -> torch.Tensor:
    """[B, seq_len, hidden] input embeddings in the model dtype (the same op as :class:`PoCRunner`)."""
    return ops.poc_inputs(block_hash, public_key, nonces, seq_len, hidden, dtype, device=device,
                          stronger_rng=stronger_rng)


class PoCWorker:
    """The worker thread of one attachment (started by ``start``, stopped by ``stop``/``detach``)."""

    def __init__(self, shared: SharedState, hidden: int, dtype: torch.dtype, device: torch.device):
        self.shared = shared
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self._thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="cpoc-worker", daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            self.shared.jobs.put(None)
            thread.join(timeout=10)
        self._thread = None

    def _loop(self) -> None:
        """Jobs: ``("readout", hs, nonces)``, ``("observe", tokens, poc_tokens, seconds,
        attention_keys, kv_tokens_read, lm_rows)``, ``("refill",)``;
        ``None`` ends the loop. Every pass (even an empty one) tops up the prepared inputs."""
        sh = self.shared
        while True:
            try:
                job = sh.jobs.get(timeout=0.05)
            except queue.Empty:
                job = ()
            if job is None:
                return
            stop, merged = False, 1
            try:
                if job and job[0] == "readout":
                    # merge the readouts already queued into one output-stage call (rows are independent; the
                    # op's per-call cost dominates for a few rows); other jobs found on the way are re-queued
                    jobs, later = [job], []
                    while True:
                        try:
                            nxt = sh.jobs.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is None:
                            stop = True
                            break
                        (jobs if nxt and nxt[0] == "readout" else later).append(nxt)
                    merged = len(jobs)
                    for j in later:
                        sh.jobs.put(j)
                    try:
                        if sh.failed is None:
                            hs = jobs[0][1] if merged == 1 else torch.cat([j[1] for j in jobs])
                            self.readout(hs, [n for j in jobs for n in j[2]])
                    finally:
                        sh.readouts_done += merged
                elif job and job[0] == "observe":
                    governor = sh.governor
                    if governor is not None:
                        with sh.gov_lock:
                            governor.observe(*job[1:])
                self.refill()
            except Exception as exc:  # noqa: BLE001 - never let PoC break chat
                sh.fail(exc, "worker")
            if stop:
                return

    def refill(self) -> None:
        """Prepare the input embeddings of up to :data:`REFILL_CHUNK` next nonces (to the prefetch depth)."""
        sh = self.shared
        rnd = sh.round
        if not sh.running or sh.failed is not None or rnd is None or rnd["exhausted"]:
            return
        need = rnd["prefetch"] - len(sh.prepared)
        if need <= 0:
            return
        nonces, ran_out = [], False
        while len(nonces) < min(need, REFILL_CHUNK):
            try:
                nonces.append(check_nonce(next(rnd["iterator"])))
            except StopIteration:
                ran_out = True
                break
        if nonces:
            embeds = poc_input_embeddings(rnd["block_hash"], rnd["public_key"], nonces, rnd["seq_len"], self.hidden,
                                          self.dtype, self.device, rnd["stronger_rng"])
            sh.prepared.extend(zip(nonces, embeds))
        if ran_out:  # only once the last nonces are visible in ``prepared``: ``wait()`` reads the flag first
            rnd["exhausted"] = True
        if nonces:
            sh.cb.wake()

    def readout(self, hs: torch.Tensor, nonces: list[int]) -> None:
        """Output stage of ``nonces`` ([n, H] final-norm rows; engine thread for PoC-only CPU steps, worker
        thread otherwise): artifacts are emitted, non-finite rows counted as dropped."""
        sh = self.shared
        rnd = sh.round
        kept, vecs = readout_vectors(hs, rnd["block_hash"], rnd["public_key"], nonces, rnd["k"])
        for nonce, vec in zip(kept, vecs):
            sh.emit(Artifact.from_vector(nonce, vec))
        with sh.count_lock:
            sh.counters["nonces_dropped_nan"] += len(nonces) - len(kept)
            sh.counters["nonces_done"] += len(nonces)
