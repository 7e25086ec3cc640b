"""Progress reporting for long runs (the CLI, the mixed-chat demo): a ``(done, total)`` callback drawing a tqdm bar.

Imports nothing of the package, so any module may use it (no import circle through the CLI).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]  # (items done, items total)


class ProgressBar:
    """``ProgressBar(total, label)(done, total=None)``: moves a tqdm bar on ``stream`` (default stderr) to ``done``;
    the bar closes (ends its line) when ``done`` reaches the total. Redraws are rate-limited by tqdm."""

    def __init__(self, total: int, label: str = "nonces", stream=None, disable: bool = False):
        from tqdm import tqdm

        self._bar = tqdm(total=max(int(total), 0), unit=" " + label, unit_scale=False, file=stream or sys.stderr,
                         disable=disable, dynamic_ncols=True, mininterval=0.1, leave=True)
        self.closed = False

    def __call__(self, done: int, total: int | None = None) -> None:
        if self.closed:
            return
        bar = self._bar
        if total is not None and total != bar.total:
            bar.total = total
        bar.update(max(0, int(done) - bar.n))
        if bar.total is not None and bar.n >= bar.total:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bar.close()
