"""The one boundary where a parsing library's failure on a user's file becomes bad input.

tifffile, PIL and zarr parse bytes and JSON that emseg did not write; on a corrupt or hostile
file they raise almost any type (ValueError, KeyError, TypeError, struct.error, zlib.error,
JSONDecodeError, codec errors...). Each call into them sits in its own small ``with untrusted(...)``
block holding nothing but that call, so what they raise becomes one :class:`BadInputError` line
while a bug in emseg's own code, outside the block, keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
