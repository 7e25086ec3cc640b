"""Artifact vector codec (spec §6 step 6): k × fp16 little-endian, standard base64. Bit-exact."""
from __future__ import annotations

import base64
import binascii

import numpy as np

from .readout import K_DIM


def vector_bytes(v16, k: int = K_DIM) -> bytes:
    """The k×2-byte little-endian fp16 payload of a length-k vector (numpy or torch; floats cast RNE)."""
    try:
        import torch

        if isinstance(v16, torch.Tensor):
            v16 = v16.detach().to("cpu", torch.float16).numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(v16)
    if arr.shape != (k,):
        raise ValueError(f"artifact vector must have shape ({k},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"artifact vector must be floating point, got {arr.dtype}")
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


def decode_vector(b64: str, k: int = K_DIM) -> np.ndarray:
    """Standard base64 of k×fp16 LE → float32 [k]. Malformed base64, wrong length or non-finite → ValueError."""
    if not isinstance(b64, (str, bytes)):
        raise ValueError(f"vector_b64 must be a string, got {type(b64).__name__}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"vector_b64 is not valid base64: {exc}") from None
    return decode_payload(raw, k)
