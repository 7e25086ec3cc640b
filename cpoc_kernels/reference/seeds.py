"""Seed strings and 32-bit seeds of PoC v2 (spec §3.1, §3.5, §4.1, §5.2, §6). Bit-exact.

The strings are consensus data: note ``nonce{n}`` (inputs) versus ``nonce_{n}`` (pick, Haar).
"""
from __future__ import annotations

import hashlib


def seed32(s: str) -> int:
    """First 4 bytes of SHA-256(utf-8(s)) read big-endian, as a Python int in [0, 2**32)."""
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:4], "big")


def input_seed_string(block_hash: str, public_key: str, nonce: int) -> str:
    return f"{block_hash}_{public_key}_nonce{nonce}"


def stronger_sub_seeds(block_hash: str, public_key: str, nonce: int) -> list[int]:
    """The eight big-endian uint32 words of SHA-256 of the input seed string (stronger RNG)."""
    d = hashlib.sha256(input_seed_string(block_hash, public_key, nonce).encode("utf-8")).digest()
    return [int.from_bytes(d[4 * i : 4 * i + 4], "big") for i in range(8)]


def layer_seed(block_hash: str, layer: int) -> int:
    return seed32(f"{block_hash}_layer_{layer}_householder")


def pick_seed(block_hash: str, public_key: str, nonce: int, k: int) -> int:
    return seed32(f"{block_hash}_{public_key}_nonce_{nonce}_pick_{k}")


def haar_seed(block_hash: str, public_key: str, nonce: int, k: int, j: int) -> int:
    return seed32(f"{block_hash}_{public_key}_nonce_{nonce}_haar_hh_{k}_{j}")


def pseudo_input_ids_seed(block_hash: str, public_key: str, nonce: int) -> int:
    """DeepSeek-V4 pseudo token ids only (spec §4.1)."""
    return seed32(f"{input_seed_string(block_hash, public_key, nonce)}_input_ids")
