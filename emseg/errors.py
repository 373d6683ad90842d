"""The two kinds of failure emseg reports to its users.

A :class:`BadInputError` is something the user can fix (a missing file, a tile the model cannot
take): the CLI prints its message on one line and exits with code 2. An :class:`EmsegRuntimeError`
is a failure while doing valid work (a full disk, a non-finite loss): exit code 1. A
:class:`Cancelled` run was stopped by its user (the napari widget's Cancel button, through
:class:`emseg.progress.Cancellable`): it unwinds like Ctrl-C, so a resumable output keeps what
is done. An :class:`Interrupted` is Ctrl-C (or SIGTERM) that reached an output being written: it
says what was kept, and the CLI how to resume (exit code 130). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class EmsegError(Exception):
    """Base class of the errors emseg reports as one line."""

    exit_code = 1


class BadInputError(EmsegError, ValueError):
    """Bad usage or bad input: the user can fix it. Exit code 2."""

    exit_code = 2


class EmsegRuntimeError(EmsegError, RuntimeError):
    """A failure while running a valid request. Exit code 1."""

    exit_code = 1


class Cancelled(EmsegError):
    """The user stopped the run between two pieces of work. Exit code 130, as for Ctrl-C."""

    exit_code = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which emseg's CLI turns into one) while an output was written: what
    the interruption kept (``kept``: "12/40 blocks of /data/out.zarr", or "nothing: ...") and
    whether ``--resume`` continues from it (``resumable``). Raised from the KeyboardInterrupt."""

    def __init__(self, kept: str, *, resumable: bool) -> None:
        super().__init__(kept)
        self.kept = kept
        self.resumable = resumable
