"""Access to the optional native extension ``cpoc_kernels._C``.

``native()`` returns the module, or ``None`` when it was not built; the package then uses its
plain-torch paths (same results, slower) and says so once with a ``RuntimeWarning``.
"""
from __future__ import annotations

import functools
import warnings
from types import ModuleType


@functools.lru_cache(maxsize=None)
def native() -> ModuleType | None:
    try:
        from cpoc_kernels import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"cpoc_kernels._C is not built ({exc}); using the slower pure-torch CPU paths",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _C
