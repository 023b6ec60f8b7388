"""Live progress: one status line on stderr, rewritten in place on a terminal (at most
10 times a second) and printed once at the end of a level otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from .records import RequestRecord


class ProgressLine:
    def __init__(self, label: str, total: int, *, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.live = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = self.errors = self.tokens = 0
        self._last_draw = 0.0

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        if rec.ok:
            self.tokens += rec.output_tokens
        elif rec.error_type != "cancelled":
            self.errors += 1
        now = time.perf_counter()
        if self.live and (now - self._last_draw > 0.1 or self.done == self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line() + "\x1b[K")
            self.stream.flush()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        return (f"[{self.label}] {self.done}/{self.total} requests, {self.errors} errors, "
                f"{tps:.1f} output tok/s, {elapsed:.1f}s")

    def close(self) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r" + self._line() + "\x1b[K\n") if self.live else self._line() + "\n")
        self.stream.flush()
