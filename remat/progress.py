"""A one-line progress bar on stderr, drawn only when stderr is a terminal.

Tracing and planning a sweep take seconds to minutes; a person at a terminal wants to
see it move, a log file or a pipe wants nothing of it.
"""

from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 24


class Progress:
    """``total`` steps; ``stage(text)`` names what runs now, ``done(i)`` marks step ``i`` done."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.finished = 0
        self.text = ""

    def stage(self, text: str) -> None:
        self.text = text
        self._draw()

    def done(self, index: int) -> None:
        self.finished = min(self.total, index + 1)
        self._draw()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = WIDTH * self.finished // max(self.total, 1)
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r\033[K[{bar}] {self.finished}/{self.total} {self.text}")
        self.stream.flush()
