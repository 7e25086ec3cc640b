"""Artifact vector codec (spec §6 step 6): k × fp16 little-endian, standard base64. Bit-exact.

Decoding accepts exactly what the network's Go decoder (``base64.StdEncoding.DecodeString`` in DAPI's
artifact callback) accepts: the standard alphabet with ``=`` padding to a whole number of 4-character
quanta, ``\r``/``\n`` ignored anywhere, no other whitespace, no missing or extra padding, nothing after
the padding; unused low bits of the last character are ignored (StdEncoding is not ``Strict``).
"""
from __future__ import annotations

import base64
import re

import numpy as np

from .readout import K_DIM


def vector_bytes(v16, k: int = K_DIM) -> bytes:
    """The k×2-byte little-endian fp16 payload of a length-k vector (numpy or torch; floats cast RNE).

    Integer, bool, complex or object arrays/tensors, wrong shapes and values not finite in fp16 → ValueError.
    """
    try:
        import torch

        if isinstance(v16, torch.Tensor):
            if not v16.dtype.is_floating_point:
                raise ValueError(f"artifact vector must be floating point, got {v16.dtype}")
            v16 = v16.detach().to("cpu", torch.float16).numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(v16, np.ndarray):
        if v16 is None or isinstance(v16, (bool, int, float, complex, str, bytes)):
            raise ValueError(f"artifact vector must be a length-{k} float array, got {type(v16).__name__}")
        try:
            v16 = np.asarray(v16)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"artifact vector is not an array: {exc}") from None
    arr = v16
    if arr.shape != (k,):
        raise ValueError(f"artifact vector must have shape ({k},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"artifact vector must be floating point, got {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        half = arr.astype("<f2")
    if not np.isfinite(half).all():
        raise ValueError("artifact vector is not finite in fp16")
    return half.tobytes()


def encode_vector(v16, k: int = K_DIM) -> str:
    """Length-k fp16 vector → 32-char standard base64 (with padding) for k = 12."""
    return base64.b64encode(vector_bytes(v16, k)).decode("ascii")


def decode_payload(raw: bytes, k: int = K_DIM) -> np.ndarray:
    """k×2 raw little-endian fp16 bytes → float32 [k]; wrong length or non-finite → ValueError."""
    if len(raw) != 2 * k:
        raise ValueError(f"artifact vector must be {2 * k} bytes ({k} x fp16), got {len(raw)}")
    half = np.frombuffer(raw, dtype="<f2")
    if not np.isfinite(half).all():
        raise ValueError("artifact vector contains NaN or Inf")
    return half.astype(np.float32)


_STD_QUANTA = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def decode_base64_std(b64: str | bytes) -> bytes:
    """Standard padded base64 → bytes, exactly as strict as Go's ``base64.StdEncoding.DecodeString``.

    Anything Go rejects → ValueError (with the offending position where there is one).
    """
    if isinstance(b64, bytes):
        text = b64.decode("latin-1")
    elif isinstance(b64, str):
        text = b64
    else:
        raise ValueError(f"vector_b64 must be a string, got {type(b64).__name__}")
    stripped = text.replace("\r", "").replace("\n", "")
    if not _STD_QUANTA.fullmatch(stripped):
        bad = next((i for i, c in enumerate(stripped) if c not in _ALPHABET), None)
        where = f" (character {stripped[bad]!r})" if bad is not None and stripped[bad] != "=" else ""
        raise ValueError(f"vector_b64 is not valid standard base64 (padding, length or alphabet){where}")
    return base64.b64decode(stripped, validate=True)


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def decode_vector(b64: str, k: int = K_DIM) -> np.ndarray:
    """Standard base64 of k×fp16 LE → float32 [k]. Base64 the network's Go decoder rejects, wrong length or
    non-finite → ValueError."""
    return decode_payload(decode_base64_std(b64), k)
