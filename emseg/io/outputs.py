"""The one output lifecycle: whatever emseg writes appears whole under its name, or not at all.

Every command that writes an output (ingest, export, export-model, predict) goes through
:class:`Output`:

1. check: a symbolic link is refused; an existing output needs ``--overwrite`` and must be one
   emseg wrote; the parent must be a writable directory;
2. lock ``.NAME.lock`` beside the output (flock): a second writer of the same output is refused;
3. clear what dead runs left: their partials are removed, and a previous output they had moved
   aside but not yet replaced is put back;
4. write into a hidden partial sibling ``.NAME.partial-PID-XXXX`` (a folder, or a file for a
   file output);
5. commit: move the previous output aside (``.NAME.previous-PID-XXXX``), rename the partial into
   place, then delete the previous one; release the lock.

On failure the partial is removed and the previous output is left untouched; an OSError (a full
disk, a write budget) becomes an :class:`~emseg.errors.EmsegRuntimeError`. A *resumable* output
(predict) writes into ``.NAME.partial/`` instead, which holds the content (``store.zarr``), its
resume record (``settings.json``: the settings a resume must match) and one done-marker per
finished piece (``done/``); on failure all of it is kept for ``--resume``.

Single files inside an output (checkpoints, metrics) are written with :func:`write_bytes_atomic`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from emseg._version import __version__
from emseg.errors import BadInputError, EmsegRuntimeError

PARTIAL_TAG = ".partial"
PREVIOUS_TAG = ".previous-"
LOCK_SUFFIX = ".lock"
#: Inside a resumable partial ``.NAME.partial/``: the content, its done-markers, its resume record.
CONTENT_NAME = "store.zarr"
DONE_DIR = "done"
SETTINGS_FILE = "settings.json"
#: What an output is, which decides its partial (a folder or a file) and what an existing output
#: must be before ``--overwrite`` replaces it:
#: "store" an OME-Zarr store (only a store emseg wrote is replaced); "run" a folder emseg fills
#: (a run directory, an exported model); "file" one file (export to .tif); "slices" a folder of
#: PNG slices (export --format png). An existing "file" or "slices" output may be either.
KINDS = ("store", "run", "file", "slices")


# --- single files ---------------------------------------------------------------------------


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
    """:func:`write_bytes_atomic` of ``obj`` as indented JSON."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# --- what an output is ----------------------------------------------------------------------


def provenance(command: str, **fields: Any) -> dict[str, Any]:
    """The ``emseg`` block of a store's attributes: what wrote it, when, from what."""
    return {
        "version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def is_emseg_store(path: Path) -> bool:
    """Whether ``path`` is a zarr store emseg wrote (its root attributes name emseg)."""
    for meta in (".zattrs", "zarr.json"):
        f = path / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, ValueError):
                return False
            if meta == "zarr.json" and isinstance(attrs, dict):
                attrs = attrs.get("attributes", attrs)
            return isinstance(attrs, dict) and "emseg" in attrs
    return False


def check_output(final: Path, overwrite: bool, *, kind: str = "store") -> None:
    """Refuse an output emseg may not write: a symlink, an existing path without ``overwrite``,
    something emseg did not write (see :data:`KINDS`), or an unwritable or non-directory parent."""
    if final.is_symlink():
        raise BadInputError(f"{final}: is a symbolic link; give the real path of the output")
    if final.exists():
        if not overwrite:
            raise BadInputError(f"{final}: already exists (use --overwrite to replace it)")
        if kind in ("file", "slices") and final.is_dir() and any(p.suffix.lower() != ".png" for p in final.iterdir()):
            raise BadInputError(f"{final}: is a folder holding other files than PNG slices; refusing to replace it")
        if kind == "store" and not is_emseg_store(final):
            raise BadInputError(f"{final}: exists and was not written by emseg; refusing to overwrite it")
    existing = final.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"{final}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"{final}: destination {existing} is not writable")


# --- the lock -------------------------------------------------------------------------------


class OutputLock:
    """An exclusive lock (flock) on ``.NAME.lock`` beside the output ``final``; a second writer
    of the same output is refused with :class:`BadInputError`. The lock file names the holder's
    process and command; the kernel drops the lock when the holder dies."""

    def __init__(self, final: Path, command: str = "command") -> None:
        self.final = Path(final)
        self.command = command
        self.path = self.final.parent / f".{self.final.name}{LOCK_SUFFIX}"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().split()
                fh.close()
                who = f"emseg {holder[1]} (process {holder[0]})" if len(holder) >= 2 else "emseg command"
                raise BadInputError(f"{self.final}: another {who} is writing this output") from None
            # the file may have been unlinked by a finishing writer between open and flock
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fh = fh
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()} {self.command}\n")
                fh.flush()
                return
            fh.close()

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- what dead runs left --------------------------------------------------------------------


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file, link or folder (a link is removed, never followed); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clear_leftovers(final: Path) -> None:
    """Remove partials of ``final`` left by processes that no longer run, and their previous
    outputs; a previous output whose process died before the new one took its place is put back."""
    if not final.parent.is_dir():
        return
    partial, previous = f".{final.name}{PARTIAL_TAG}-", f".{final.name}{PREVIOUS_TAG}"
    for entry in sorted(final.parent.iterdir()):
        for prefix in (partial, previous):
            if not entry.name.startswith(prefix) or entry.is_symlink():
                continue
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if prefix == previous and not final.exists() and not final.is_symlink():
                os.rename(entry, final)
            else:
                _remove(entry)


# --- the lifecycle --------------------------------------------------------------------------


class Output:
    """One output written whole or not at all; use as a context manager.

    Inside the ``with`` block write to :attr:`path` (an empty folder, or for ``kind="file"`` a
    file path that does not exist yet); leaving the block without an exception commits it.
    ``command`` names the writer in the lock. Give ``resume_record`` (JSON-ready) to make the
    output resumable: a run with ``resume=True`` then continues an interrupted one whose record
    is equal (:attr:`resumed`; :attr:`done_dir` holds its done-markers) and refuses another.
    ``create(path)`` builds fresh content (not called when resuming); a resume record is saved
    only after it returned, so a run killed while creating is never resumed.
    """

    def __init__(
        self,
        final: str | Path,
        *,
        overwrite: bool = False,
        kind: str = "store",
        command: str = "command",
        resume_record: dict[str, Any] | None = None,
        resume: bool = False,
        create: Callable[[Path], None] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        self.final = Path(final).absolute()
        self.kind = kind
        self.overwrite = overwrite
        self.resume = resume
        self.resumed = False
        self._record = resume_record
        self._create = create
        self._lock = OutputLock(self.final, command)
        if resume_record is not None:
            self._partial = self.final.parent / f".{self.final.name}{PARTIAL_TAG}"
            self.path = self._partial / CONTENT_NAME
        else:
            self._partial = self.final.parent / f".{self.final.name}{PARTIAL_TAG}-{_tag()}"
            self.path = self._partial

    @property
    def resumable(self) -> bool:
        return self._record is not None

    @property
    def done_dir(self) -> Path:
        """The folder of done-markers of a resumable output (one empty file per finished piece)."""
        if not self.resumable:
            raise ValueError("only a resumable output has done-markers")
        return self._partial / DONE_DIR

    def done_names(self) -> set[str]:
        return {p.name for p in self.done_dir.iterdir()}

    def _failed(self, exc: OSError) -> EmsegRuntimeError:
        then = "rerun with --resume to finish it" if self.resumable else "nothing was changed"
        return EmsegRuntimeError(f"{self.final}: writing failed ({exc.strerror or exc}); {then}")

    # -- enter ------------------------------------------------------------------------------

    def __enter__(self) -> Output:
        check_output(self.final, self.overwrite, kind=self.kind)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"{self.final}: cannot create {self.final.parent} ({exc.strerror or exc})") from None
        self._lock.acquire()
        try:
            clear_leftovers(self.final)  # may put back a previous output a dead run had moved aside
            check_output(self.final, self.overwrite, kind=self.kind)  # again, now that no other emseg writes it
            if self.resumable:
                self._start_resumable()
            else:
                self._start_fresh(self._partial)
        except OSError as exc:
            self._abandon()
            self._lock.release()
            raise self._failed(exc) from exc
        except BaseException:
            self._abandon()
            self._lock.release()
            raise
        return self

    def _start_fresh(self, content: Path) -> None:
        if self.kind != "file":
            content.mkdir()
        if self._create is not None:
            self._create(content)

    def _start_resumable(self) -> None:
        settings = self._partial / SETTINGS_FILE
        if self.resume and settings.is_file() and self.path.is_dir():
            try:
                saved = json.loads(settings.read_text())
            except ValueError:
                saved = None
            if saved != json.loads(json.dumps(self._record)):
                raise BadInputError(
                    f"--resume: the interrupted run in {self._partial.name} used other settings or another "
                    "input; run again without --resume to start afresh"
                )
            self.resumed = True
            return
        _remove(self._partial)
        self._partial.mkdir()
        self._start_fresh(self.path)
        self.done_dir.mkdir()
        write_json_atomic(settings, self._record)

    # -- exit -------------------------------------------------------------------------------

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc is None:
                try:
                    self._commit()
                except OSError as err:
                    self._abandon()
                    raise self._failed(err) from err
                return
            self._abandon()
            if isinstance(exc, OSError):
                raise self._failed(exc) from exc
        finally:
            self._lock.release()

    def _commit(self) -> None:
        previous = None
        if self.final.exists() or self.final.is_symlink():
            previous = self.final.parent / f".{self.final.name}{PREVIOUS_TAG}{_tag()}"
            os.rename(self.final, previous)
        try:
            os.rename(self.path, self.final)
        except OSError:
            if previous is not None:
                os.rename(previous, self.final)
            raise
        if previous is not None:
            _remove(previous)
        if self.resumable:
            _remove(self._partial)

    def _abandon(self) -> None:
        """After a failure: a resumable output keeps its partial for ``--resume``; any other loses it."""
        if not self.resumable:
            _remove(self._partial)


__all__ = [
    "KINDS",
    "Output",
    "OutputLock",
    "check_output",
    "clear_leftovers",
    "is_emseg_store",
    "provenance",
    "write_bytes_atomic",
    "write_json_atomic",
]
