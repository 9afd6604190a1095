"""Progress of a driver loop (products recorded, images generated): count, rate and ETA."""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(self, total: int, unit: str, out: Callable[[str], None] = print):
        self.total, self.unit, self.out = total, unit, out
        self.done, self.started = 0, time.perf_counter()

    def track(self, items, label=str):
        """Yield each item; count it done when the loop body moves on to the next one."""
        for item in items:
            yield item
            self.advance(label(item))

    def advance(self, what: str = "", n: int = 1) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.out(f"    {self.done}/{self.total} {self.unit} {what} ({rate:.2f}/s, ETA {eta:.0f}s)".replace("  (", " ("))
