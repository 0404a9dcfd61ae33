"""Progress lines for long work: indexing many files, writing benchmark data, the demo data.

Quick work stays silent: the first line appears only once the work has taken `every_s`, then
one line every `every_s` with the count, the rate and the time left, and a last line when
done. Lines go through `logging`, so they land wherever the command's log goes.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("npyloader")

EVERY_S = 2.0


class Progress:
    """`with Progress("reading .npy headers", total) as p: ... p.advance()`."""

    def __init__(self, what: str, total: int, unit: str = "", every_s: float | None = None,
                 logger: logging.Logger = log) -> None:
        self.what = what
        self.total = total
        self.unit = f" {unit}" if unit else ""
        self.every_s = EVERY_S if every_s is None else every_s
        self.done = 0
        self._log = logger
        self._started = time.monotonic()
        self._next = self._started + self.every_s
        self._shown = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            self._shown = True
            self._log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done:,} of {self.total:,}{self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.0f}/s"
        if 0 < self.done < self.total:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown and exc[0] is None:
            self._log.info("%s: done, %s in %.1f s", self.what, f"{self.done:,}{self.unit}",
                           time.monotonic() - self._started)
