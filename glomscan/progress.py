"""Progress display: a tqdm bar on a terminal, plain log lines (every 10 %) otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("glomscan.progress")


class Progress:
    def __init__(self, total: int, label: str, quiet: bool = False, unit: str = "tile"):
        self.total, self.label, self.quiet, self.unit = total, label, quiet, unit
        self.done = 0
        self._bar = None
        self._next_log = 0.1
        self._t0 = time.perf_counter()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.quiet and self.total and self.done / self.total >= self._next_log:
            rate = self.done / max(time.perf_counter() - self._t0, 1e-9)
            log.info("%s: %d/%d %ss (%.0f%%, %.2f %s/s)", self.label, self.done, self.total,
                     self.unit, 100 * self.done / self.total, rate, self.unit)
            while self._next_log <= self.done / self.total:
                self._next_log += 0.1

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
