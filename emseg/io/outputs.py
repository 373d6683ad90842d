"""The one output lifecycle: whatever emseg writes appears whole under its name, or not at all.

Every command that writes an output (ingest, export, export-model, predict, segment) goes
through :class:`Output`:

1. check: an output that is, lies inside, contains or links to one of the command's inputs is
   refused (with or without ``--overwrite``); a symbolic link, a FIFO, socket or device node is
   refused; an existing output needs ``--overwrite`` and must carry emseg's marker (a store's
   ``emseg`` attributes, a TIFF's Software tag, a PNG's Software text, a JSON file's ``emseg``
   key); the parent must be a writable directory;
2. lock ``.NAME.lock`` beside the output (flock): a second writer of the same output is refused;
3. clear what dead runs left: their partials are removed, and a previous output they had moved
   aside but not yet replaced is put back;
4. write into a hidden partial sibling ``.NAME.partial-PID-XXXX`` (a folder, or a file for a
   file output);
5. commit: move the previous output aside (``.NAME.previous-PID-XXXX``), rename the partial into
   place, then delete the previous one; release the lock.

On failure the partial is removed and the previous output is left untouched; an OSError (a full
disk, a write budget) becomes an :class:`~emseg.errors.EmsegRuntimeError`, and Ctrl-C an
:class:`~emseg.errors.Interrupted` that says what was kept. A *resumable* output
(predict, segment) writes into ``.NAME.partial/`` instead, which holds the content
(``store.zarr``), its resume record (``settings.json``: the settings a resume must match) and one
done-marker per finished piece (``done/``); on failure all of it is kept for ``--resume``. The
finished store keeps the record in its ``emseg`` attributes (``resume_record``), so that
:func:`complete_output` can tell ``--resume`` on a complete output "nothing to do" from "made
otherwise".

Single files inside an output (checkpoints, metrics) are written with :func:`write_bytes_atomic`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from emseg._version import __version__
from emseg.errors import BadInputError, EmsegError, EmsegRuntimeError, Interrupted

log = logging.getLogger(__name__)

PARTIAL_TAG = ".partial"
PREVIOUS_TAG = ".previous-"
LOCK_SUFFIX = ".lock"
#: Inside a resumable partial ``.NAME.partial/``: the content, its done-markers, its resume record.
CONTENT_NAME = "store.zarr"
DONE_DIR = "done"
SETTINGS_FILE = "settings.json"
#: The marker file emseg writes first into a resumable partial: a partial without it (and not
#: one of emseg's from before it) is a user's and is never deleted.
PARTIAL_MARKER = "emseg-partial.json"
#: Everything emseg puts into a resumable partial (segment adds its scratch array and faces).
_PARTIAL_ENTRIES = frozenset({PARTIAL_MARKER, CONTENT_NAME, DONE_DIR, SETTINGS_FILE, "scratch.zarr", "faces"})
#: What an output is, which decides its partial (a folder or a file) and what an existing output
#: must be before ``--overwrite`` replaces it:
#: "store" an OME-Zarr store (only a store emseg wrote is replaced); "run" a folder emseg fills
#: (a run directory, an exported model: replaced when it holds emseg's JSON); "file" one file
#: (a TIFF, PNG or JSON emseg wrote); "slices" a folder of PNG slices emseg wrote. An existing
#: "file" or "slices" output may be either.
KINDS = ("store", "run", "file", "slices")
#: The marker emseg writes into the files it makes: a TIFF's Software tag and a PNG's Software
#: text start with it; a JSON file emseg writes is an object with this key.
MARKER = "emseg"
#: Files an exported model or run directory holds whose ``emseg`` key marks the folder as emseg's.
RUN_MARKERS = ("emseg-model.json", "config.json")
RUN_MARKER_KEYS = (MARKER, "emseg_version")


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


def _small_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is not a small regular file of JSON (a FIFO or a
    device is never opened)."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 2**26:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _emseg_attrs(path: Path) -> dict[str, Any] | None:
    """The ``emseg`` block of the root attributes of the zarr store ``path`` (v2 or v3), or None
    where there is none or it cannot be read."""
    for meta in (".zattrs", "zarr.json"):
        f = path / meta
        if f.exists() or f.is_symlink():
            attrs = _small_json(f)
            if meta == "zarr.json" and isinstance(attrs, dict):
                attrs = attrs.get("attributes", attrs)
            if not isinstance(attrs, dict) or "emseg" not in attrs:
                return None
            return attrs["emseg"] if isinstance(attrs["emseg"], dict) else {}
    return None


def is_emseg_store(path: Path) -> bool:
    """Whether ``path`` is a zarr store emseg wrote (its root attributes name emseg)."""
    return _emseg_attrs(path) is not None


def complete_output(final: str | Path, record: dict[str, Any], *, overwrite: bool, resume: bool) -> bool:
    """Whether a resumable store ``final`` is already complete, to be checked before it is opened:
    True when ``resume`` (without ``overwrite``) finds it made with the same resume ``record``
    (JSON-ready; stored as ``resume_record`` in its ``emseg`` attributes). Refuses, in one line,
    an existing output that neither option allows, one emseg did not write, or a complete one
    made with another record (or none: written before stores kept theirs). False when there is
    nothing to finish yet or ``overwrite`` replaces it; a symlink is refused when it is opened."""
    final = Path(final)
    if final.is_symlink() or not final.exists():
        return False
    if not (overwrite or resume):
        raise BadInputError(f"{final}: already exists (use --overwrite to replace it, or --resume)")
    saved = _emseg_attrs(final)
    if saved is None:
        raise BadInputError(f"{final}: exists and was not written by emseg; refusing to replace it")
    if overwrite:
        return False
    made = saved.get("resume_record")
    if made != json.loads(json.dumps(record)):
        how = "other settings or other inputs" if made is not None else "an emseg that kept no resume record"
        raise BadInputError(
            f"--resume: {final} is complete but was made with {how}; use --overwrite to replace it, or another output"
        )
    return True


def software_tag() -> str:
    """What emseg writes as the Software of the TIFF and PNG files it makes."""
    return f"{MARKER} {__version__}"


def _png_is_emseg(path: Path) -> bool:
    """Whether a PNG carries a ``Software`` text chunk naming emseg (read from its chunks before
    the image data, at most 1 MiB; nothing is decoded)."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
        seen = 0
        while seen < 2**20:
            head = fh.read(8)
            if len(head) < 8:
                return False
            size, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND") or size > 2**20:
                return False
            body = fh.read(size)
            fh.seek(4, os.SEEK_CUR)
            seen += size + 12
            if kind == b"tEXt" and body.startswith(b"Software\0" + MARKER.encode()):
                return True
    return False


def _tiff_is_emseg(path: Path) -> bool:
    """Whether a TIFF's first page has a Software tag naming emseg."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            software = getattr(tif.pages[0], "software", "")
            return isinstance(software, str) and software.startswith(MARKER)
    # a user's file tifffile cannot parse: whatever it raises, it is not one emseg wrote
    except Exception:  # noqa: BLE001
        return False


def _json_is_emseg(path: Path, keys: tuple[str, ...] = (MARKER,)) -> bool:
    obj = _small_json(path)
    return isinstance(obj, dict) and any(k in obj for k in keys)


def is_emseg_file(path: Path) -> bool:
    """Whether the regular file ``path`` is a TIFF, PNG or JSON emseg wrote (its marker says so)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return _png_is_emseg(path)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_is_emseg(path)
    if head.lstrip()[:1] == b"{":
        return _json_is_emseg(path)
    return False


def is_emseg_output(path: Path, kind: str) -> bool:
    """Whether the existing ``path`` is an output of ``kind`` emseg wrote, which ``--overwrite``
    may replace: a store with emseg's attributes, a run folder holding emseg's JSON, a file with
    emseg's marker, or a folder of PNG slices that all carry it."""
    if path.is_symlink() or not (path.is_dir() or path.is_file()):
        return False
    if kind == "store":
        return path.is_dir() and is_emseg_store(path)
    if kind == "run":
        return path.is_dir() and any(_json_is_emseg(path / name, RUN_MARKER_KEYS) for name in RUN_MARKERS)
    if path.is_file():
        return is_emseg_file(path)
    entries = list(path.iterdir())
    return bool(entries) and all(p.suffix.lower() == ".png" and is_emseg_file(p) for p in entries)


def partial_is_emseg(partial: Path) -> bool:
    """Whether ``partial`` is a resumable partial folder emseg made: it holds emseg's marker
    (:data:`PARTIAL_MARKER`), or (made before the marker existed) only what emseg puts there,
    with a resume record."""
    if partial.is_symlink() or not partial.is_dir():
        return False
    if _json_is_emseg(partial / PARTIAL_MARKER):
        return True
    names = {p.name for p in partial.iterdir()}
    return SETTINGS_FILE in names and all(n in _PARTIAL_ENTRIES or n.startswith(f".{SETTINGS_FILE}.tmp") for n in names)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _relation(output: Path, source: Path) -> str | None:
    """How ``output`` overlaps ``source`` after resolving links: "is", "lies inside",
    "contains", or None. Hard links are found by :func:`os.path.samefile`."""
    out, src = _real(output), _real(source)
    if out == src or _samefile(output, source):
        return "is"
    if src in out.parents:
        return "lies inside"
    if out in src.parents:
        return "contains"
    for parent in out.parents:  # a parent of the output may be a hard-linked name of the input folder
        if parent.exists() and _samefile(parent, source):
            return "lies inside"
    return None


def check_inputs(final: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, lies inside, contains or links to one of ``inputs`` (symlinks
    resolved), with or without ``--overwrite``: emseg never writes over what it reads."""
    final = Path(final).absolute()
    for source in inputs:
        if source is None:
            continue
        relation = _relation(final, Path(source).absolute())
        if relation is not None:
            raise BadInputError(
                f"{final}: the output {relation} the input {source}; emseg never writes over what it reads "
                "(choose another output path)"
            )


def check_output(
    final: Path, overwrite: bool, *, kind: str = "store", inputs: Iterable[str | Path | None] = ()
) -> None:
    """Refuse an output emseg may not write: one that overlaps an input (:func:`check_inputs`), a
    symlink, anything but a regular file or folder, an existing path without ``overwrite``,
    something emseg did not write (:func:`is_emseg_output`), or an unwritable or non-directory
    parent."""
    check_inputs(final, inputs)
    if final.is_symlink():
        raise BadInputError(f"{final}: is a symbolic link; give the real path of the output")
    try:
        mode: int | None = os.lstat(final).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise BadInputError(f"{final}: a parent of the output is a file, not a directory") from None
    except OSError as exc:
        raise BadInputError(f"{final}: cannot examine the destination ({exc.strerror or exc})") from None
    if mode is not None:
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise BadInputError(
                f"{final}: is not a regular file or folder (a FIFO, socket or device); emseg never writes it"
            )
        if not overwrite:
            raise BadInputError(f"{final}: already exists (use --overwrite to replace it)")
        if not is_emseg_output(final, kind):
            raise BadInputError(
                f"{final}: exists and was not written by emseg (it carries no emseg marker); refusing to replace it"
            )
    _check_parent(final)
    check_lock_path(final)


def _check_parent(final: Path) -> None:
    """The nearest existing folder above ``final`` must be a writable directory."""
    existing = final.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"{final}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"{final}: destination {existing} is not writable")
    check_writable(existing, final)


def check_writable(folder: Path, final: Path) -> None:
    """Create and remove one empty hidden file in ``folder``, where ``final`` is to be written:
    the check that holds for every user and file system (``os.access`` grants root everything,
    and knows nothing of /proc or /sys, which refuse new files whatever the permissions say).
    An unwritable folder is one line (:func:`destination_error`), before any work."""
    probe = folder / f".emseg-probe-{_tag()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the folder is there: a virtual file system that takes no files
            raise BadInputError(
                f"{final}: cannot write in {folder} (it takes no new files: a virtual file system such as /proc?); "
                "choose a writable destination"
            ) from None
        raise destination_error(final, exc, f"write in {folder}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


# --- the lock -------------------------------------------------------------------------------

#: What emseg writes into its lock file: "PID COMMAND". A lock file holding anything else is not
#: emseg's and is never truncated.
_LOCK_LINE = re.compile(rb"\A(\d+ [A-Za-z][\w-]*\n?)?\Z")
#: errno values that mean the destination cannot take a write at all (the user can fix it);
#: others (a full disk, a write budget, an I/O error) are runtime failures.
_UNWRITABLE = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EINVAL, errno.EISDIR,
               errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP}  # fmt: skip


def destination_error(path: Path, exc: OSError, doing: str) -> EmsegError:
    """An OSError while creating ``path`` as one line: :class:`BadInputError` when the destination
    cannot be written at all (a read-only or virtual file system such as /proc, no permission),
    :class:`EmsegRuntimeError` for a failure while writing (a full disk, a write budget)."""
    message = f"{path}: cannot {doing} ({exc.strerror or exc})"
    if exc.errno in _UNWRITABLE:
        return BadInputError(f"{message}; choose a writable destination")
    return EmsegRuntimeError(message)


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a file"
    return "a device"


def check_lock_path(final: Path) -> None:
    """Refuse, before any work, what a lock of ``final`` could not be: its ``.NAME.lock`` is
    checked as :class:`OutputLock` will open it (a symbolic link, folder, FIFO, hard link or a
    file holding anything but emseg's holder line is one line), without creating anything."""
    lock = final.parent / f".{final.name}{LOCK_SUFFIX}"
    if not (lock.exists() or lock.is_symlink()):
        return
    fd = open_own_file(lock, "lock file", create=False)
    try:
        held = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    if not _LOCK_LINE.match(held):
        raise BadInputError(_foreign_lock(lock))


def _foreign_lock(lock: Path) -> str:
    return (
        f"{lock}: is not an emseg lock file (it holds other data); emseg never overwrites it "
        "(move it away, or choose another output)"
    )


def open_own_file(path: Path, what: str, *, create: bool = True) -> int:
    """Open (creating it) the regular file ``path`` that emseg keeps for itself (a lock) read-write,
    never through a symbolic link, never a FIFO, socket, device or folder, never a file with
    other hard links (writing it would change another name's content), never truncating it.
    Returns the file descriptor; anything else is refused in one line naming ``what`` it is."""
    wrong = f"{path}: emseg's {what} is {{}}; emseg never writes through it (remove it, or choose another output)"
    try:
        mode: int | None = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise destination_error(path, exc, f"examine its {what}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise BadInputError(wrong.format(_kind_of(mode)))
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link appeared since the lstat
            raise BadInputError(wrong.format("a symbolic link")) from None
        raise destination_error(path, exc, f"create its {what}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = _kind_of(info.st_mode) if not stat.S_ISREG(info.st_mode) else "a hard link to another file"
        raise BadInputError(wrong.format(kind))
    os.set_blocking(fd, True)
    return fd


class OutputLock:
    """An exclusive lock (flock) on ``.NAME.lock`` beside the output ``final``; a second writer
    of the same output is refused with :class:`BadInputError`. The lock file names the holder's
    process and command; the kernel drops the lock when the holder dies. The lock file is emseg's
    own: a symbolic link, folder, FIFO, hard link or a file with other content at its path is
    refused (:func:`open_own_file`), never followed, truncated or rewritten."""

    def __init__(self, final: Path, command: str = "command") -> None:
        self.final = Path(final)
        self.command = command
        self.path = self.final.parent / f".{self.final.name}{LOCK_SUFFIX}"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = open_own_file(self.path, "lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").split()
                os.close(fd)
                who = f"emseg {holder[1]} (process {holder[0]})" if len(holder) >= 2 else "emseg command"
                raise BadInputError(f"{self.final}: another {who} is writing this output") from None
            except OSError as exc:
                os.close(fd)
                raise destination_error(self.path, exc, "lock it") from None
            # the file may have been unlinked by a finishing writer between open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self._claim(fd)
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise
            self._fd = fd
            return

    def _claim(self, fd: int) -> None:
        """Write "PID COMMAND" into the locked file, once it is known to be an emseg lock file
        (empty, or a holder line a dead emseg left)."""
        held = os.pread(fd, 4096, 0)
        if not _LOCK_LINE.match(held):
            raise BadInputError(_foreign_lock(self.path))
        line = f"{os.getpid()} {self.command}\n".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
        except OSError as exc:
            raise destination_error(self.path, exc, "write its lock file") from None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # unlink only the file this lock holds
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino:
                    os.unlink(self.path)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

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


def _is_emseg_leftover(entry: Path) -> bool:
    """Whether ``entry`` (named like a partial or previous output of a dead process) is emseg's:
    an empty folder, an output emseg wrote of any kind, or a resumable partial with its marker."""
    if entry.is_symlink():
        return False
    if entry.is_dir() and not any(entry.iterdir()):
        return True
    return partial_is_emseg(entry) or any(is_emseg_output(entry, kind) for kind in KINDS)


def clear_leftovers(final: Path) -> None:
    """Remove partials of ``final`` left by processes that no longer run, and their previous
    outputs; a previous output whose process died before the new one took its place is put back.
    Only what carries emseg's marker is removed: a user's file or folder that happens to have
    such a name stays (with a warning)."""
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
            elif _is_emseg_leftover(entry):
                _remove(entry)
            else:
                log.warning("%s: named like an unfinished emseg output, but emseg did not write it; left alone", entry)


# --- the lifecycle --------------------------------------------------------------------------


class Output:
    """One output written whole or not at all; use as a context manager.

    Inside the ``with`` block write to :attr:`path` (an empty folder, or for ``kind="file"`` a
    file path that does not exist yet); leaving the block without an exception commits it.
    ``command`` names the writer in the lock. Give ``resume_record`` (JSON-ready) to make the
    output resumable: a run with ``resume=True`` then continues an interrupted one whose record
    is equal (:attr:`resumed`; :attr:`done_dir` holds its done-markers) and refuses another.
    ``inputs`` are what the command reads: an output overlapping one is refused (:func:`check_inputs`).
    ``create(path)`` builds fresh content (not called when resuming); a resume record is saved
    only after it returned, so a run killed while creating is never resumed.
    """

    def __init__(
        self,
        final: str | Path,
        *,
        overwrite: bool,
        kind: str = "store",
        command: str = "command",
        resume_record: dict[str, Any] | None = None,
        resume: bool | None = None,
        create: Callable[[Path], None] | None = None,
        inputs: Iterable[str | Path | None] = (),
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        self.final = Path(final).absolute()
        self.kind = kind
        self.overwrite = overwrite
        self.resume = bool(resume)
        self.resumed = False
        self._record = resume_record
        self._create = create
        self._inputs = [Path(p) for p in inputs if p is not None]
        self._lock = OutputLock(self.final, command)
        #: How many done-markers a finished run leaves, and what they count (:meth:`expect`).
        self.total: int | None = None
        self.unit = "pieces"
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

    def expect(self, total: int, unit: str) -> None:
        """A finished run leaves ``total`` done-markers, each one of ``unit`` ("blocks"): what an
        interruption reports as kept ("12/40 blocks of OUT")."""
        self.total, self.unit = total, unit

    def _interrupted(self) -> Interrupted:
        """What Ctrl-C kept, once the partial was abandoned: a resumable partial with its record
        (its done pieces), or nothing (the partial was removed)."""
        settings = self._partial / SETTINGS_FILE
        if self.resumable and settings.is_file() and self.done_dir.is_dir():
            of = "" if self.total is None else f"/{self.total}"
            kept = f"{len(self.done_names())}{of} {self.unit} of {self.final} (in {self._partial.name})"
            return Interrupted(kept, resumable=True)
        earlier = "; the earlier one is untouched" if self.final.exists() else ""
        return Interrupted(f"nothing: the unfinished {self.final.name} was removed{earlier}", resumable=False)

    def _failed(self, exc: OSError) -> EmsegRuntimeError:
        then = "rerun with --resume to finish it" if self.resumable else "nothing was changed"
        return EmsegRuntimeError(f"{self.final}: writing failed ({exc.strerror or exc}); {then}")

    # -- enter ------------------------------------------------------------------------------

    def __enter__(self) -> Output:
        check_output(self.final, self.overwrite, kind=self.kind, inputs=self._inputs)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise destination_error(self.final.parent, exc, "create the output's folder") from None
        self._lock.acquire()
        try:
            clear_leftovers(self.final)  # may put back a previous output a dead run had moved aside
            # again, now that no other emseg writes it
            check_output(self.final, self.overwrite, kind=self.kind, inputs=self._inputs)
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
        partial, settings = self._partial, self._partial / SETTINGS_FILE
        if (partial.exists() or partial.is_symlink()) and not partial_is_emseg(partial):
            kind = _kind_of(os.lstat(partial).st_mode)
            raise BadInputError(
                f"{partial}: is {kind} emseg did not write (it keeps an unfinished output there); "
                "emseg never deletes it: move it away, or choose another output"
            )
        if self.resume and settings.is_file() and self.path.is_dir():
            if _small_json(settings) != json.loads(json.dumps(self._record)):
                raise BadInputError(
                    f"--resume: the interrupted run in {partial.name} used other settings or another "
                    "input; run again without --resume to start afresh"
                )
            self.resumed = True
            return
        _remove(partial)
        partial.mkdir()
        write_json_atomic(partial / PARTIAL_MARKER, {MARKER: __version__, "command": self._lock.command})
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
            self._abandon(fresh_and_refused=isinstance(exc, BadInputError))
            if isinstance(exc, OSError):
                raise self._failed(exc) from exc
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
                raise self._interrupted() from exc
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

    def _abandon(self, fresh_and_refused: bool = False) -> None:
        """After a failure: a resumable output keeps its partial for ``--resume``; any other loses
        it, and so does a resumable one refused as bad input before a piece of it was done."""
        if not self.resumable:
            _remove(self._partial)
        elif fresh_and_refused and not self.resumed and self._partial.is_dir():
            done = self._partial / DONE_DIR
            if not (done.is_dir() and any(done.iterdir())):
                _remove(self._partial)


__all__ = [
    "KINDS",
    "Output",
    "OutputLock",
    "MARKER",
    "check_inputs",
    "check_output",
    "check_writable",
    "complete_output",
    "is_emseg_file",
    "is_emseg_output",
    "software_tag",
    "clear_leftovers",
    "is_emseg_store",
    "provenance",
    "write_bytes_atomic",
    "write_json_atomic",
]
