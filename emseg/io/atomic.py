"""Outputs that appear whole or not at all.

Directory outputs (zarr stores, run directories' files) are written into a hidden temporary
sibling and renamed into place at the end; a failed or interrupted write leaves nothing under the
final name. ``--overwrite`` replaces only what emseg itself wrote, and never follows a symlink.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emseg.errors import BadInputError, EmsegRuntimeError

PARTIAL_TAG = ".partial-"


def partial_name(final: Path, tag: str | None = None) -> Path:
    """Hidden sibling of ``final`` holding an unfinished write: ``.NAME.partial-PID-XXXX``."""
    tag = tag or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return final.parent / f".{final.name}{PARTIAL_TAG}{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(final: Path) -> None:
    """Remove partial siblings of ``final`` left by processes that no longer run."""
    prefix = f".{final.name}{PARTIAL_TAG}"
    if not final.parent.is_dir():
        return
    for entry in final.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink():
            continue
        pid_part = entry.name[len(prefix):].split("-", 1)[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            shutil.rmtree(entry, ignore_errors=True)


def is_emseg_store(path: Path) -> bool:
    """Whether ``path`` is a zarr store emseg wrote (its root attributes name emseg)."""
    for meta in (".zattrs", "zarr.json"):
        f = path / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, ValueError):
                return False
            attrs = attrs.get("attributes", attrs) if meta == "zarr.json" else attrs
            return isinstance(attrs, dict) and "emseg" in attrs
    return False


def check_output(final: Path, overwrite: bool, *, kind: str = "store") -> None:
    """Refuse an output emseg may not write: an existing path without ``overwrite``, a symlink,
    something emseg did not write, or an unwritable or non-directory parent."""
    if final.is_symlink():
        raise BadInputError(f"{final}: is a symbolic link; give the real path of the output")
    if final.exists():
        if not overwrite:
            raise BadInputError(f"{final}: already exists (use --overwrite to replace it)")
        if kind == "file" and final.is_dir() and any(p.suffix.lower() != ".png" for p in final.iterdir()):
            raise BadInputError(f"{final}: is a folder holding other files than PNG slices; refusing to replace it")
        if kind == "store" and not is_emseg_store(final):
            raise BadInputError(f"{final}: exists and was not written by emseg; refusing to overwrite it")
    parent = final.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"{final}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"{final}: destination {existing} is not writable")


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing an earlier emseg output only after the new one is whole."""
    trash = None
    if final.exists():
        trash = partial_name(final, f"{os.getpid()}-old-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
    os.rename(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False, *, kind: str = "store") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` when the block succeeds.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary directory is
    removed and ``final`` is left as it was. An OSError such as a full disk becomes an
    :class:`EmsegRuntimeError`.
    """
    final = Path(final).absolute()
    check_output(final, overwrite, kind=kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = partial_name(final)
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmsegRuntimeError(f"{final}: writing failed ({exc.strerror or exc}); nothing was changed") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half a file."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
