"""Progress reporting without printing: the library calls a :class:`Reporter`, the CLI draws it.

Long-running library functions take ``progress: Reporter | None``. ``None`` means silence; the
CLI passes a rich progress bar (see ``emseg.cli``). Tests can pass a recorder.
"""

from __future__ import annotations

from typing import Any, Protocol


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


def format_duration(seconds: float) -> str:
    """A duration as people read it: ``75.4`` -> ``1m15s``, hours as ``2h05m``, ``inf`` -> ``unknown``."""
    if seconds == float("inf"):
        return "unknown"
    whole = int(round(seconds))
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"
