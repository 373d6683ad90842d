"""Progress reporting without printing: the library calls a :class:`Reporter`, the CLI draws it.

Long-running library functions take ``progress: Reporter | None``. ``None`` means silence; the
CLI passes a rich progress bar (see ``emseg.cli``). Tests can pass a recorder.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from emseg.errors import Cancelled


class Reporter(Protocol):
    """Receives progress from a long-running library function."""

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        """A new phase begins with ``total`` units of work (``None`` if unknown)."""

    def advance(self, amount: float = 1, **fields: Any) -> None:
        """``amount`` units are done; ``fields`` carry figures to show (loss, MB/s, ...)."""

    def finish(self) -> None:
        """The current phase is over."""


class NullReporter:
    """The silent reporter."""

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        pass

    def advance(self, amount: float = 1, **fields: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def reporter_or_null(progress: Reporter | None) -> Reporter:
    return NullReporter() if progress is None else progress


class Cancellable:
    """``inner`` that stops the run once ``stop`` is set: its next ``start`` or ``advance``
    raises :class:`~emseg.errors.Cancelled`. Blockwise commands report after every block, so the
    run stops between blocks and unwinds as Ctrl-C does (the blocks in flight finish; a resumable
    output keeps its partial and done-markers for a resume)."""

    def __init__(self, inner: Reporter, stop: threading.Event) -> None:
        self.inner = inner
        self.stop = stop

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        self._check()
        self.inner.start(description, total, unit)

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self.inner.advance(amount, **fields)
        self._check()

    def finish(self) -> None:
        self.inner.finish()

    def _check(self) -> None:
        if self.stop.is_set():
            raise Cancelled("cancelled")


class Eta:
    """The time left in a phase, at the rate since its first ``advance`` (which may be the jump
    over work a resumed run had done, or the first piece, which also paid for start-up): None
    until a second advance has measured a rate."""

    def __init__(self) -> None:
        self.since: tuple[float, float] | None = None

    def start(self) -> None:
        self.since = None

    def update(self, done: float, total: float | None, now: float | None = None) -> float | None:
        """Seconds left after ``done`` of ``total`` units, ``now`` (time.monotonic()) by default."""
        now = time.monotonic() if now is None else now
        if self.since is None:
            self.since = (now, done)
            return None
        t0, d0 = self.since
        if not total or done <= d0 or now <= t0:
            return None
        return max(0.0, total - done) * (now - t0) / (done - d0)


def format_duration(seconds: float) -> str:
    """A duration as people read it: ``75.4`` -> ``1m15s``, hours as ``2h05m``, ``inf`` -> ``unknown``."""
    if seconds == float("inf"):
        return "unknown"
    whole = int(round(seconds))
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"
