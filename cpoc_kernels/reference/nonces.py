"""Nonce assignment of a vLLM backend (spec §8). Bit-exact."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

INT32_MAX = 2**31 - 1


class NonceIterator:
    """nonce_x = node_id + group_id*node_count + x*(n_groups*node_count), x = 0, 1, 2, …

    Iterating yields Python ints and stops before leaving the chain's int32 range. ``take(n)``
    returns the next n nonces (and advances), as the reference's batches do.
    """

    def __init__(self, node_id: int, node_count: int, group_id: int = 0, n_groups: int = 1):
        if node_count < 1 or not 0 <= node_id < node_count:
            raise ValueError(f"need 0 <= node_id < node_count, got node_id={node_id}, node_count={node_count}")
        if n_groups < 1 or not 0 <= group_id < n_groups:
            raise ValueError(f"need 0 <= group_id < n_groups, got group_id={group_id}, n_groups={n_groups}")
        self.node_id, self.node_count, self.group_id, self.n_groups = node_id, node_count, group_id, n_groups
        self._x = 0

    def nonce(self, x: int) -> int:
        return self.node_id + self.group_id * self.node_count + x * (self.n_groups * self.node_count)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        value = self.nonce(self._x)
        if value > INT32_MAX:
            raise StopIteration
        self._x += 1
        return value

    def take(self, n: int) -> list[int]:
        return list(itertools.islice(self, n))


INT32_MIN = -(2**31)


def check_nonces(nonces) -> list[int]:
    """Nonces as Python ints in the chain's int32 range; anything else → ValueError.

    Accepts a sequence/iterable of ints (numpy integers included) or a 1-D integer torch tensor.
    Refused: bools, floats (even integral ones), strings, None, out-of-int32 values, a lone int or string.
    """
    import numbers

    import torch

    if isinstance(nonces, torch.Tensor):
        if nonces.dtype.is_floating_point or nonces.dtype.is_complex or nonces.dtype == torch.bool or nonces.dim() != 1:
            raise ValueError(f"nonces must be a 1-D integer tensor, got {nonces.dtype} {tuple(nonces.shape)}")
        nonces = nonces.tolist()
    elif isinstance(nonces, (str, bytes, numbers.Number)) or nonces is None:
        raise ValueError(f"nonces must be a sequence of ints, got {type(nonces).__name__}")
    try:
        items = list(nonces)
    except TypeError:
        raise ValueError(f"nonces must be a sequence of ints, got {type(nonces).__name__}") from None
    out = []
    for n in items:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ValueError(f"nonce must be an integer, got {type(n).__name__} {n!r}"[:120])
        n = int(n)
        if not INT32_MIN <= n <= INT32_MAX:
            raise ValueError(f"nonce {n} is outside the chain's int32 range")
        out.append(n)
    return out
