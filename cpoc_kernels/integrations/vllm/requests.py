"""PoC nonces as ordinary vLLM requests (no vLLM import at module level).

A nonce becomes ``TokensPrompt(prompt_token_ids=[0]*seq_len, cache_salt=<unique per round and nonce>)`` +
``SamplingParams(max_tokens=1, temperature=0, detokenize=False, skip_reading_prefix_cache=True,
extra_args={"cpoc": {...}})``. vLLM's own scheduler then mixes it with chat (chunked prefill included);
the worker side recognises it by ``extra_args["cpoc"]`` and computes the nonce on its rows. The request
finishes by the stock ``max_tokens`` rule with one dummy token; the artifact comes back through the
worker extension (``collective_rpc("cpoc_drain")``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cpoc_kernels.artifacts import check_nonce
from cpoc_kernels.reference.readout import K_DIM

EXTRA_ARGS_KEY = "cpoc"
PAYLOAD_VERSION = 1
PLACEHOLDER_TOKEN_ID = 0


class PoCRequestError(ValueError):
    """A request's ``extra_args["cpoc"]`` payload (or its prompt / sampling settings) is not a valid PoC nonce."""


@dataclass(frozen=True)
class PoCRound:
    """Everything that fixes a nonce's computation except the nonce itself (and the model's weights)."""

    block_hash: str
    public_key: str
    seq_len: int = 1024
    k: int = K_DIM
    stronger_rng: bool = False
    model: str = ""
    """Optional model tag, only mixed into the cache salt (different models never share PoC KV)."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_hash, str) or not self.block_hash:
            raise PoCRequestError(f"block_hash must be a non-empty string, got {self.block_hash!r}")
        if not isinstance(self.public_key, str) or not self.public_key:
            raise PoCRequestError(f"public_key must be a non-empty string, got {self.public_key!r}")
        for name in ("seq_len", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PoCRequestError(f"{name} must be a positive int, got {value!r}")
        if self.k < 2:
            raise PoCRequestError(f"k must be >= 2, got {self.k}")
        if not isinstance(self.stronger_rng, bool):
            raise PoCRequestError(f"stronger_rng must be a bool, got {self.stronger_rng!r}")

    @property
    def salt_prefix(self) -> str:
        """Short digest of every field: the part of the cache salt shared by the round's nonces."""
        text = "\x1f".join([self.block_hash, self.public_key, str(self.seq_len), str(self.k),
                            str(int(self.stronger_rng)), self.model])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def cache_salt(self, nonce: int) -> str:
        """Prefix-cache salt unique per (round, nonce): identical placeholder prompts never share KV blocks."""
        return f"cpoc-v{PAYLOAD_VERSION}:{self.salt_prefix}:{check_nonce(nonce)}"

    def payload(self, nonce: int) -> dict[str, Any]:
        """The msgpack-safe ``extra_args["cpoc"]`` dict for ``nonce`` (plain str/int/bool only)."""
        return {"v": PAYLOAD_VERSION, "block_hash": self.block_hash, "public_key": self.public_key,
                "seq_len": self.seq_len, "k": self.k, "stronger_rng": self.stronger_rng,
                "nonce": check_nonce(nonce)}


@dataclass(frozen=True)
class PoCRequestSpec:
    """One nonce as request pieces: ``prompt`` (a ``TokensPrompt`` dict) and ``SamplingParams`` keyword args."""

    round: PoCRound
    nonce: int
    prompt: dict[str, Any] = field(repr=False)
    sampling_kwargs: dict[str, Any] = field(repr=False)

    def to_vllm(self):
        """``(TokensPrompt, SamplingParams)`` for ``LLM.generate`` / ``AsyncLLM.generate`` (imports vLLM)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        return TokensPrompt(**self.prompt), SamplingParams(**self.sampling_kwargs)


def poc_request(round: PoCRound, nonce: int) -> PoCRequestSpec:
    """The request pieces for one nonce of ``round`` (no vLLM needed)."""
    nonce = check_nonce(nonce)
    prompt = {"prompt_token_ids": [PLACEHOLDER_TOKEN_ID] * round.seq_len, "cache_salt": round.cache_salt(nonce)}
    sampling = {"max_tokens": 1, "temperature": 0.0, "detokenize": False, "skip_reading_prefix_cache": True,
                "extra_args": {EXTRA_ARGS_KEY: round.payload(nonce)}}
    return PoCRequestSpec(round, nonce, prompt, sampling)


def parse_poc_payload(extra_args: Any) -> tuple[PoCRound, int] | None:
    """``(round, nonce)`` from a request's ``SamplingParams.extra_args``; None for a chat request.

    A present but malformed ``"cpoc"`` entry → :class:`PoCRequestError` (the worker then refuses the request:
    it computes no artifact for it, never a wrong one).
    """
    if not isinstance(extra_args, dict) or EXTRA_ARGS_KEY not in extra_args:
        return None
    payload = extra_args[EXTRA_ARGS_KEY]
    if not isinstance(payload, dict):
        raise PoCRequestError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict, got {type(payload).__name__}")
    if payload.get("v") != PAYLOAD_VERSION:
        raise PoCRequestError(f"unsupported cpoc payload version {payload.get('v')!r} (expected {PAYLOAD_VERSION})")
    try:
        round_ = PoCRound(payload["block_hash"], payload["public_key"], payload["seq_len"], payload["k"],
                          payload["stronger_rng"])
        nonce = check_nonce(payload["nonce"])
    except KeyError as exc:
        raise PoCRequestError(f"cpoc payload lacks {exc}") from None
    except ValueError as exc:
        raise PoCRequestError(str(exc)) from None
    return round_, nonce


def check_poc_sampling(skip_reading_prefix_cache: Any, max_tokens: Any, prompt_len: int, round: PoCRound) -> None:
    """Refuse PoC requests whose settings could give a wrong artifact (→ :class:`PoCRequestError`).

    Reading the prefix cache would skip rows whose inputs the plugin injects; a prompt of the wrong
    length would read out the wrong position.
    """
    if skip_reading_prefix_cache is not True:
        raise PoCRequestError("PoC requests need SamplingParams(skip_reading_prefix_cache=True): prefix caching "
                              "must not be forced on PoC requests")
    if max_tokens != 1:
        raise PoCRequestError(f"PoC requests need max_tokens=1, got {max_tokens!r}")
    if prompt_len != round.seq_len:
        raise PoCRequestError(f"PoC prompt has {prompt_len} tokens, its round says seq_len={round.seq_len}")
