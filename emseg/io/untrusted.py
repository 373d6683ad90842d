"""The one boundary where a parsing library's failure on a user's file becomes bad input.

tifffile, PIL and zarr parse bytes and JSON that emseg did not write; on a corrupt or hostile
file they raise almost any type (ValueError, KeyError, TypeError, struct.error, zlib.error,
JSONDecodeError, codec errors...). Each call into them sits in its own small ``with untrusted(...)``
block holding nothing but that call, so what they raise becomes one :class:`BadInputError` line
while a bug in emseg's own code, outside the block, keeps its traceback. :func:`check_source`
is the rule for what an input may be before it is opened at all: a regular file or a folder.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from emseg.errors import BadInputError


@contextlib.contextmanager
def untrusted(message: str, tail: str = "") -> Iterator[None]:
    """Re-raise any failure inside the block as ``BadInputError("<message> (<type>: <error>)<tail>")``.

    MemoryError and BadInputError pass through unchanged (as do KeyboardInterrupt and SystemExit,
    which are not Exceptions).
    """
    try:
        yield
    except (BadInputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a library parsing an untrusted file: any type means bad input
        raise BadInputError(f"{message} ({type(exc).__name__}: {exc}){tail}") from None


def check_source(path: str | Path, what: str = "input") -> Path:
    """Refuse, before anything opens it, an input that is missing or is not a regular file or a
    folder (after following links): reading a FIFO, socket or device may block forever or have
    side effects. Returns the path."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise BadInputError(f"{path}: the {what} is {kind}, not a file or folder; emseg reads only regular files")
    return path
