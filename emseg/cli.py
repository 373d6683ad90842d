"""The ``emseg`` command line: each command parses its options and calls one function of
:mod:`emseg.api`. Progress bars and tables are drawn here, on stderr, and nowhere else.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from emseg._version import __version__
from emseg.config import (
    PREVIEW_OUTPUT,
    SHOW_OUTPUT,
    BenchConfig,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ExportModelConfig,
    IngestConfig,
    ModelConfig,
    PredictConfig,
    PreviewConfig,
    SegmentConfig,
    ShowConfig,
    TrainConfig,
    flag_of,
    metavar_of,
    options,
    user_options,
)
from emseg.errors import EmsegError, Interrupted
from emseg.progress import format_duration

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as _click
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _click  # type: ignore[no-redef]


def _error_line(message: str, prefix: str = "emseg: error: ") -> None:
    """The one line a user sees for an error: ``emseg: error: MESSAGE`` on stderr."""
    sys.stderr.write(f"{prefix}{message}\n")
    sys.stderr.flush()


def resume_command(argv: Sequence[str]) -> str:
    """The command line that resumes ``emseg ARGV``: the same arguments with ``--resume``, quoted
    for a POSIX shell. An ``--overwrite`` given stays: with ``--resume`` it continues the partial
    all the same, and still replaces the earlier output it was asked to (without it, a complete
    earlier output would be "nothing to resume", or refused as made otherwise)."""
    return shlex.join(["emseg", *argv, *([] if "--resume" in argv else ["--resume"])])


def interrupted_line(exc: BaseException, command: str, argv: Sequence[str], resumes: bool) -> str:
    """The one line Ctrl-C (or SIGTERM) prints: what the interrupted command kept and how to go
    on (the command that resumes it, where ``emseg COMMAND`` has ``--resume``)."""
    if not isinstance(exc, Interrupted):  # before any output was begun, or between two of them
        return "interrupted; no output was replaced"
    if not exc.resumable:
        return f"interrupted: kept {exc.kept}"
    if not resumes:
        return f"interrupted: kept {exc.kept}; emseg {command} does not resume it (run it again)"
    return f"interrupted: kept {exc.kept}; resume with: {resume_command(argv)}"


def _flags_take_no_value(params: list[Any]) -> list[Any]:
    """``params`` with every flag's metavar empty: Typer's help shows ``<bool>`` after a flag
    (``--tta <bool>``), which reads as if it took a value (``--tta true`` is refused)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """An emseg command: its help shows flags without a value (:func:`_flags_take_no_value`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


#: OSErrors that say what state the machine is in (a full disk or quota, a read-only file system,
#: no permission, a failing device), not what emseg did wrong: one line and exit code 1 wherever
#: they arise (the library maps those of its outputs with their context; this is the net).
_MACHINE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
)


class _OneLineErrors(TyperGroup):
    """The command group, where every error a user sees is made one line: an emseg error (its
    message, its exit code) and a usage error (an unknown option, a value the option's type
    refuses, a missing argument: exit code 2) alike, instead of click's framed usage block."""

    #: The command line's arguments (after ``emseg``), for the command that resumes an interrupted one.
    argv: Sequence[str] = ()

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # Typer ends it silently with exit code 130: say what was kept
            name = ctx.invoked_subcommand or ""
            command = self.commands.get(name)
            resumes = command is not None and any(p.name == "resume" for p in command.params)
            _error_line(interrupted_line(exc, name, self.argv, resumes), prefix="emseg: ")
            raise

    def main(  # type: ignore[override]
        self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> Any:  # fmt: skip
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except EmsegError as exc:
            _error_line(str(exc))
            sys.exit(exc.exit_code)
        except _click.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except _click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _error_line(" ".join(exc.format_message().split()) + where)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("emseg: aborted\n")
            sys.exit(1)
        except OSError as exc:  # what the library did not map: the machine's state is one line, a bug is not
            if exc.errno not in _MACHINE_ERRNOS:
                raise
            logging.getLogger("emseg").debug("the failure in full", exc_info=True)
            _error_line(f"{exc.filename}: {exc.strerror}" if exc.filename else f"{exc.strerror or exc}")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="emseg",
    help="Segment electron-microscopy stacks: ingest, train, predict, evaluate.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (typer imports shellingham only then)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stdout = Console()
stderr = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
#: Seconds between progress lines when stderr is not a terminal (EMSEG_PROGRESS_INTERVAL overrides).
PROGRESS_INTERVAL_S = 10.0


class PlainReporter:
    """A :class:`emseg.progress.Reporter` for a stderr that is not a terminal (a log file, a batch
    job): one line at the start, then one every ``interval`` seconds (what, done/total, rate, ETA),
    and one at the end."""

    def __init__(self, interval: float | None = None) -> None:
        env = os.environ.get("EMSEG_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env) if env else PROGRESS_INTERVAL_S
        self._what, self._unit, self._done = "", "", 0.0
        self._total: float | None = None
        self._t0 = self._last = 0.0
        self._info = ""

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        self._what, self._total, self._unit, self._done = description, total, unit, 0.0
        self._t0 = self._last = time.monotonic()
        self._info = ""
        size = "" if total is None else f" ({total:.0f} {unit or 'units'})"
        self._write(f"{description}: started{size}")

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self._done += amount
        self._info = _fields(fields)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(self._line(now))

    def finish(self) -> None:
        if self._what:
            self._write(f"{self._line(time.monotonic())}, done")
        self._what = ""

    def _line(self, now: float) -> str:
        elapsed = max(now - self._t0, 1e-9)
        rate = self._done / elapsed
        unit = self._unit or "units"
        if not self._total and not self._done:  # nothing counted: only the time
            line = f"{self._what}: {format_duration(elapsed)} elapsed"
            return f"{line}  {self._info}" if self._info else line
        line = f"{self._what}: {self._done:.0f}"
        if self._total:
            line += f"/{self._total:.0f} {unit} ({self._done / self._total:.0%})"
        else:
            line += f" {unit}"
        line += f", {rate:.3g} {unit}/s, {format_duration(elapsed)} elapsed"
        if self._total and self._done < self._total:
            line += f", ETA {format_duration((self._total - self._done) / rate if rate > 0 else float('inf'))}"
        return f"{line}  {self._info}" if self._info else line

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(f"emseg: {text}\n")
        sys.stderr.flush()


class RichReporter:
    """A :class:`emseg.progress.Reporter` drawing rich progress bars with ETA on stderr; when
    stderr is not a terminal it prints plain progress lines instead (:class:`PlainReporter`)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and stderr.is_terminal
        self._plain = PlainReporter() if enabled and not stderr.is_terminal else None
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: float | None, unit: str = "") -> None:
        if self._plain is not None:
            self._plain.start(description, total, unit)
        if not self.enabled:
            return
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=stderr,
            )
            self._progress.start()
        self._task = self._progress.add_task(description, total=total, unit=unit, info="")

    def advance(self, amount: float = 1, **fields: Any) -> None:
        if self._plain is not None:
            self._plain.advance(amount, **fields)
        if self._progress is None or self._task is None:
            return
        info = _fields(fields)
        self._progress.update(self._task, advance=amount, info=info)

    def finish(self) -> None:
        if self._plain is not None:
            self._plain.finish()
        if self._progress is not None and self._task is not None:
            self._progress.refresh()
        self._task = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: How a progress field's unit prefix reads (``mb_per_s`` -> ``MB/s``).
_UNITS = {"mb": "MB", "gb": "GB", "mpix": "MPix"}


def _fields(fields: dict[str, Any]) -> str:
    """A progress line's figures: ``loss 0.43  time left 0m57s  30.36 crops/s  90.07 MB/s``."""
    out = []
    for key, value in fields.items():
        if key.endswith("_per_s"):
            unit = key.removesuffix("_per_s")
            out.append(f"{_fmt(value)} {_UNITS.get(unit, unit.replace('_', ' '))}/s")
        else:
            out.append(f"{key.replace('_', ' ')} {_fmt(value)}")
    return "  ".join(out)


def command(name: str, *, examples: tuple[str, str]) -> Callable[[F], F]:
    """Register the command ``name`` (its errors become one line in :class:`_OneLineErrors`), its
    help ending with ``examples``: command lines, each starting with ``emseg NAME``."""
    from rich.markup import escape

    if len(examples) < 2 or not all(e.startswith(f"emseg {name}") for e in examples):
        raise ValueError(f"emseg {name}: give two examples, each starting with 'emseg {name}'")
    epilog = "[bold]Examples[/bold]\n" + "\n".join(escape(e) for e in examples)

    def decorate(fn: F) -> F:
        app.command(name, cls=_Command, epilog=epilog)(fn)
        return fn

    return decorate


def _version(value: bool) -> None:
    if value:
        stdout.print(f"emseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what emseg does (INFO level)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Segment electron-microscopy stacks: ingest, train, predict, evaluate."""
    _setup_logging(logging.INFO if verbose else logging.WARNING)


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is logged (a test runner replaces it
    per command), not to the stream that was current when the handler was made."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(level: int) -> None:
    logger = logging.getLogger("emseg")
    logger.setLevel(level)
    if not any(getattr(h, "_emseg", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LowerLevelFormatter("emseg: %(levelname)s: %(message)s"))
        handler._emseg = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    for h in logger.handlers:
        h.setLevel(level)


QUIET = typer.Option(
    False, "--quiet", "-q", help="Nothing on stderr (no progress, no notes); results still go to stdout."
)


def opt(cls: type, name: str) -> Any:
    """The Typer option of the config field ``cls.name``: its default, flag, short flag, help,
    metavar (:func:`~emseg.config.metavar_of`: what the parser accepts) and the completion of its
    choices, as :mod:`emseg.config` declares them (the one place an option is written)."""
    f = options(cls)[name]
    meta = f.metadata
    decls = [flag_of(f), *([meta["short"]] if meta["short"] else [])]
    extra: dict[str, Any] = {}
    metavar = metavar_of(f)
    if metavar is not None:
        extra["metavar"] = metavar
    if meta["choices"]:
        extra["autocompletion"] = _completes(meta["choices"])
    return typer.Option(f.default, *decls, help=meta["help"], **extra)


def _completes(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Shell completion of an option's choices."""

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


def _cli_type(cls: type, name: str) -> Any:
    """The type Typer parses an option as: text for options parsed from text (``A:B``), else the
    field's type (``X | None`` as ``Optional[X]``, the form Typer reads on every Python)."""
    meta = options(cls)[name].metadata
    if meta["parse"] is not None:  # repeatable when it takes any number of texts (--class)
        return Optional[list[str]] if meta["kind"] == (str, None) else Optional[str]
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if type(None) in args:
        return Optional[next(a for a in args if a is not type(None))]
    return hint


def with_options(*classes: type) -> Callable[[F], F]:
    """Give a command the user options of ``classes`` as Typer options (:func:`opt`), placed
    before its ``--quiet``; the command receives them in ``**options``. Nothing about an option
    is typed in this module."""
    names = {name: cls for cls in classes for name in user_options(cls)}

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.kind is not p.VAR_KEYWORD
        ]
        at = next((i for i, p in enumerate(own) if p.name == "quiet"), len(own))
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        added = [inspect.Parameter(n, kind, default=opt(c, n), annotation=_cli_type(c, n)) for n, c in names.items()]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            return fn(**kwargs)

        wrapper.__signature__ = inspect.Signature([*own[:at], *added, *own[at:]])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper  # type: ignore[return-value]

    return decorate


def _quiet_log(quiet: bool) -> None:
    """With --quiet, emseg's log says nothing short of an error."""
    if quiet:
        _setup_logging(logging.ERROR)


def _note(quiet: bool, message: str) -> None:
    """A line on stderr for the user, unless --quiet."""
    if not quiet:
        stderr.print(message)


def _call(quiet: bool, command: str, *args: Any, progress: bool = True, **kwargs: Any) -> Any:
    """``emseg.api.<command>(*args, **kwargs)`` as every command calls it: --quiet applied to the
    log, and with ``progress`` a progress display on stderr (none with --quiet)."""
    from emseg import api

    _quiet_log(quiet)
    if not progress:
        return getattr(api, command)(*args, **kwargs)
    with RichReporter(not quiet) as reporter:
        return getattr(api, command)(*args, **kwargs, progress=reporter)


@command(
    "ingest",
    examples=(
        "emseg ingest train-volume.tif --labels train-labels.tif -o isbi.zarr --voxel-size 50 4 4",
        "emseg ingest slices/ -o stack.zarr --chunks 1 512 512 --ngff 0.5 --shards 1 2048 2048",
    ),
)
@with_options(IngestConfig)
def ingest_cmd(
    source: Path = typer.Argument(..., help="Multi-page TIFF/BigTIFF, folder of TIFF/PNG slices, or a 2D image."),
    output: Path = typer.Option(..., "--output", "-o", help="Output OME-Zarr store (DIR.zarr)."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", "-l", help="Labels, same kind and shape (cell > 0, or the codes --class names)."
    ),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Convert a TIFF stack or slice folder (and its labels) into chunked OME-Zarr."""
    _note(quiet, f"wrote {_call(quiet, 'ingest', source, output, labels=labels, **options)}")


@command(
    "info",
    examples=(
        "emseg info isbi.zarr",
        "emseg info pred.zarr --json",
    ),
)
def info_cmd(
    path: Path = typer.Argument(..., help="An OME-Zarr store."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    quiet: bool = QUIET,
) -> None:
    """Shape, dtype, chunks, voxel size, levels and labels of an OME-Zarr store."""
    result = _call(quiet, "info", path, progress=False)
    if as_json:
        stdout.print_json(json.dumps(result))
        return
    table = Table(title=str(path), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("NGFF", result["ngff"])
    if result["channels"]:
        table.add_row("shape (c, z, y, x)", " x ".join(map(str, result["shape"])))
        table.add_row("channels", ", ".join(result["channels"]))
    else:
        table.add_row("shape (z, y, x)", " x ".join(map(str, result["shape"])))
    table.add_row("dtype", result["dtype"])
    table.add_row("chunks", " x ".join(map(str, result["chunks"])))
    if result["shards"]:
        table.add_row("shards", " x ".join(map(str, result["shards"])))
    table.add_row("voxel size (nm)", " x ".join(f"{v:g}" for v in result["voxel_size_nm"]))
    table.add_row("levels", ", ".join("x".join(map(str, s)) for s in result["levels"]))
    table.add_row("size", f"{result['size_bytes'] / 2**20:.1f} MiB uncompressed")
    if result.get("image_label"):
        table.add_row("label image", _described(result["image_label"]))
    for name, lab in result["labels"].items():
        table.add_row(f"labels/{name}", _described(lab))
    if not result["labels"]:
        table.add_row("labels", "none")
    if result["emseg"]:
        table.add_row(
            "written by",
            f"emseg {result['emseg'].get('version')} {result['emseg'].get('command')} "
            f"on {result['emseg'].get('created')}",
        )
    segmentation = result["emseg"].get("segmentation")
    if isinstance(segmentation, dict) and isinstance(segmentation.get("settings"), dict):
        from emseg.segmentation.calibrate import describe_settings

        origin = segmentation.get("from") or {"": f"the calibration of run {segmentation.get('run')}"}
        table.add_row("segmentation", f"{describe_settings(segmentation['settings'])}; from {_origins(origin)}")
    stdout.print(table)


@command(
    "models",
    examples=(
        "emseg models",
        "emseg models --json",
    ),
)
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    quiet: bool = QUIET,
) -> None:
    """The models that ship with emseg: use builtin:NAME wherever a run directory is taken."""
    found = _call(quiet, "builtin_models", progress=False)
    if as_json:
        stdout.print_json(json.dumps(found))
        return
    for m in found:  # one two-column table per model: readable in an 80-column terminal
        table = Table(title=f"{m['name']} (predict, export-model, train --init, the napari widget)", show_header=False)
        table.add_column(no_wrap=True, style="bold")
        table.add_column()
        table.add_row("what", m["task"])
        table.add_row("size", f"{m['parameters'] / 1e6:.2f} M parameters, {m['size_bytes'] / 2**20:.1f} MiB")
        table.add_row("pixel size", f"{m['pixel_size_nm']:g} nm (predict resamples other pixel sizes to it)")
        for name, value in m["scores"].items():
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
        table.add_row("trained on", m["training_data"])
        table.add_row("licence", m["licence"])
        stdout.print(table)


def _origins(origin: dict[str, str]) -> str:
    """Where segmentation settings came from: one source, or each setting's."""
    sources = set(origin.values())
    if len(sources) == 1:
        return sources.pop()
    return "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in origin.items())


def _described(lab: dict[str, Any]) -> str:
    """A mask's foreground fraction, the number of objects of instance labels, or a class image's
    classes and their shares (``emseg info``)."""
    if lab.get("kind") == "classes":
        shares = lab["class_fractions"]
        if shares is None:
            return f"{len(lab['classes'])} classes: " + ", ".join(lab["classes"])
        note = "" if lab["fraction_level"] == 0 else f" (level {lab['fraction_level']})"
        return f"{len(lab['classes'])} classes: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items()) + note
    if lab.get("kind") == "instances":
        if lab["objects"] is None:
            return "instance labels (no level under 1 Gi elements to count their objects)"
        level = lab["objects_level"]
        return f"{lab['objects']} objects" + ("" if level == 0 else f" (at least: counted on level {level})")
    if lab["foreground_fraction"] is None:
        return "present (no level under 1 Gi elements to measure its foreground)"
    note = "" if lab["fraction_level"] == 0 else f" (estimated from level {lab['fraction_level']})"
    return f"foreground fraction {lab['foreground_fraction']:.4f}{note}"


@command(
    "show",
    examples=(
        "emseg show isbi.zarr --slice 5 -o view.png",
        "emseg show isbi.zarr --pred pred.zarr --slice 28 -o overlay.png",
    ),
)
@with_options(ShowConfig)
def show_cmd(
    data: Path = typer.Argument(..., help="An OME-Zarr store from emseg ingest."),
    output: Path = typer.Option(Path(SHOW_OUTPUT), "--output", "-o", help="PNG to write."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="A prediction store from emseg predict."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Save a PNG of a slice beside its mask (and prediction with an overlay)."""
    _note(quiet, f"wrote {_call(quiet, 'show', data, output, pred=pred, progress=False, **options)}")


@command(
    "train",
    examples=(
        "emseg train isbi.zarr -o run --val-slices 27:30 --time-limit 600",
        "emseg train isbi.zarr -o run --init builtin:membranes --epochs 10 --resume",
    ),
)
@with_options(TrainConfig, ModelConfig)
def train_cmd(
    data: Path = typer.Argument(
        ..., help="OME-Zarr store with labels/cells or labels/classes (emseg ingest --labels [--class])."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory for checkpoints, metrics and curves."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Train a U-Net on annotated slices: weight-map loss, elastic augmentation, checkpoints, curves."""
    summary = _call(quiet, "train", data, output, **options)
    if summary.get("rows") is None:
        return
    columns = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_iou", "v_rand", "v_info", "seconds")
    table = Table(title=f"training run {output}")
    for col in columns:
        table.add_column(col.replace("_", " "), justify="right")
    for row in summary["rows"][-5:]:
        table.add_row(*[_fmt(row.get(c)) if row.get(c) is not None else "" for c in columns])
    if not quiet:
        stderr.print(table)
    if summary.get("segmentation"):
        from emseg.segmentation.calibrate import describe_calibration, describe_settings

        cal = summary["segmentation"]
        _note(quiet, f"emseg segment will use {describe_settings(cal['settings'])}: {describe_calibration(cal)}")
    calibrated = " and segmentation.json" if summary.get("segmentation") else ""
    stdout.print(f"checkpoints, metrics.csv, curves.png{calibrated} in {output}")


@command(
    "predict",
    examples=(
        "emseg predict run isbi.zarr -o pred.zarr --tta",
        "emseg predict builtin:membranes stack.zarr -o pred.zarr --workers 4 --resume",
    ),
)
@with_options(PredictConfig)
def predict_cmd(
    model: Path = typer.Argument(
        ..., help="Run directory or .safetensors checkpoint from emseg train, or builtin:membranes (emseg models)."
    ),
    data: Path = typer.Argument(..., help="OME-Zarr store to segment."),
    output: Path = typer.Option(..., "--output", "-o", help="Output OME-Zarr (probabilities + labels/membranes)."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Segment a stack of any size: overlapping tiles, blended without seams, via dask."""
    _note(quiet, f"wrote {_call(quiet, 'predict', model, data, output, **options)}")


@command(
    "segment",
    examples=(
        "emseg segment pred.zarr -o cells.zarr --mode 3d",
        "emseg segment pred.zarr -o cells.zarr --calibrate isbi.zarr --slices 27:30 --resume",
    ),
)
@with_options(SegmentConfig)
def segment_cmd(
    pred: Path = typer.Argument(..., help="Prediction store from emseg predict (P(cell))."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output OME-Zarr label image (SEG.zarr)."),
    into: Optional[Path] = typer.Option(
        None, "--into", help="Instead of -o: add the labels to this prediction store (PRED itself) as labels/cells."
    ),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Instance labels from membranes: watershed, agglomeration, blockwise without seams."""
    _note(quiet, f"wrote {_call(quiet, 'segment', pred, into or output, into=into is not None, **options)}")


def _instance_table(pred: Path, data: Path, r: dict[str, Any]) -> Table:
    """The scores of an instance segmentation (``emseg evaluate SEG.zarr DATA.zarr``)."""
    table = Table(title=f"{pred} against {data} ({r['n_slices']} slices, {r['n_objects']} objects)")
    for name in ("metric", "value", "note"):
        table.add_column(
            name, style="bold" if name == "metric" else None, justify="right" if name == "value" else "left"
        )
    note = "boundaries as membrane; split {:.4f}, merge {:.4f}"
    table.add_row("V_rand", f"{r['v_rand']:.4f}", note.format(r["v_rand_split"], r["v_rand_merge"]))
    table.add_row("V_info", f"{r['v_info']:.4f}", note.format(r["v_info_split"], r["v_info_merge"]))
    table.add_row("adapted Rand error", f"{r['adapted_rand_error']:.4f}", "CREMI / SNEMI3D (lower is better)")
    table.add_row("VOI", f"{r['voi']:.4f}", f"split {r['voi_split']:.4f}, merge {r['voi_merge']:.4f} (nats)")
    return table


@command(
    "evaluate",
    examples=(
        "emseg evaluate pred.zarr isbi.zarr --slices 27:30",
        "emseg evaluate cells.zarr isbi.zarr --json scores.json",
    ),
)
@with_options(EvaluateConfig)
def evaluate_cmd(
    pred: Path = typer.Argument(..., help="Prediction store from emseg predict, or a TIFF stack of P(cell)."),
    data: Path = typer.Argument(..., help="OME-Zarr store with labels/cells (the ground truth)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the scores as JSON."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Score a segmentation: pixel error, IoU, Dice, ISBI 2012 V_rand and V_info."""
    r = _call(quiet, "evaluate", pred, data, json_path=json_path, progress=False, **options)
    if r.get("kind") == "instances":
        stdout.print(_instance_table(pred, data, r))
        return
    if r.get("kind") == "classes":
        stdout.print(_class_table(pred, data, r))
        return
    table = Table(title=f"{pred} against {data} ({r['n_slices']} slices)")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row(
        "V_rand",
        f"{r['v_rand']:.4f}",
        f"best at threshold {r['v_rand_threshold']:.1f}; split {r['v_rand_split']:.4f}, merge {r['v_rand_merge']:.4f}",
    )
    table.add_row(
        "V_info",
        f"{r['v_info']:.4f}",
        f"best at threshold {r['v_info_threshold']:.1f}; split {r['v_info_split']:.4f}, merge {r['v_info_merge']:.4f}",
    )
    table.add_row("pixel error", f"{r['pixel_error']:.4f}", "at P(cell) > 0.5")
    table.add_row("pixel accuracy", f"{r['pixel_accuracy']:.4f}", "")
    table.add_row("IoU (cells)", f"{r['iou']:.4f}", "")
    table.add_row("Dice (cells)", f"{r['dice']:.4f}", "")
    stdout.print(table)


def _class_table(pred: Path, data: Path, r: dict[str, Any]) -> Table:
    """``emseg evaluate`` of a multi-class prediction: a row per class, objects where scored."""
    table = Table(title=f"{pred} against {data} ({r['n_slices']} slices, labelled pixels)")
    for name in ("class", "IoU", "Dice", "objects: precision", "recall", "F1 (IoU >= 0.5)"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for name, s in r["classes"].items():
        obj = s.get("objects")
        cells = ["", "", ""] if obj is None else [f"{obj[k]:.3f}" for k in ("precision", "recall", "f1")]
        iou, dice = (f"{s[k]:.4f}" if k in s else "absent" for k in ("iou", "dice"))
        table.add_row(name, iou, dice, *cells)
    table.add_row("mean", f"{r['mean_iou']:.4f}", "", "", "", "")
    if "v_rand" in r:
        table.caption = f"membrane against the rest: V_rand {r['v_rand']:.4f} (threshold {r['v_rand_threshold']:.1f})"
    return table


@command(
    "bench",
    examples=(
        "emseg bench --quick",
        "emseg bench --device cuda --compile --json bench.json",
    ),
)
@with_options(BenchConfig)
def bench_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="Run directory to time (default: the default U-Net)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Time the forward pass, end-to-end predict (vs MONAI) and training on this machine."""
    with contextlib.nullcontext() if quiet else stderr.status("benchmarking (a few minutes)..."):
        r = _call(quiet, "bench", model=model, json_path=json_path, progress=False, **options)
    table = Table(title=f"emseg bench on {r['device']} (torch {r['torch']})")
    for col in ("measure", "setting", "MPix/s", "TFLOP/s", "of peak", "note"):
        table.add_column(col, justify="right" if col in ("MPix/s", "TFLOP/s", "of peak") else "left")
    for row in r["forward"]["rows"]:
        if "error" in row:
            table.add_row("forward", row["variant"], "", "", "", row["error"])
            continue
        peak = "" if row["fraction_of_peak"] is None else f"{row['fraction_of_peak']:.0%}"
        table.add_row(
            "forward",
            f"{row['variant']}, {row['batch']} x {row['tile']}²",
            f"{row['mpix_per_s']:.3g}",
            f"{row['tflop_per_s']:.3g}",
            peak,
            f"{row['gflop_per_tile']:.1f} GFLOP/tile",
        )
    p = r["predict"]
    shape = " x ".join(map(str, p["emseg"]["stack"]))
    table.add_row("predict", f"emseg, zarr to zarr, {shape}", f"{p['emseg']['mpix_per_s']:.3g}", "", "", p["model"])
    if isinstance(p.get("monai_in_memory"), dict):
        table.add_row(
            "predict",
            "MONAI sliding window, in memory",
            f"{p['monai_in_memory']['mpix_per_s']:.3g}",
            "",
            "",
            f"emseg / MONAI = {p['ratio']:.2f}",
        )
    t = r["train"]
    table.add_row(
        "train",
        f"{t['batch']} x {t['crop']}² + augmentation",
        f"{t['mpix_per_s']:.3g}",
        "",
        "",
        f"{t['steps_per_s']:.2f} steps/s, augmentation {t['augmentation_share']:.0%} of a step",
    )
    stdout.print(table)


@command(
    "export",
    examples=(
        "emseg export pred.zarr -o pred.tif",
        "emseg export pred.zarr -o membranes --format png --labels membranes",
    ),
)
@with_options(ExportConfig)
def export_cmd(
    source: Path = typer.Argument(..., help="An OME-Zarr store (e.g. from emseg predict)."),
    output: Path = typer.Option(..., "--output", "-o", help="OUT.tif, or a folder with --format png."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Export a store to a calibrated TIFF stack (ImageJ hyperstack or OME-TIFF) or PNG slices."""
    _note(quiet, f"wrote {_call(quiet, 'export', source, output, **options)}")


@command(
    "export-model",
    examples=(
        "emseg export-model run -o model",
        "emseg export-model builtin:membranes -o membranes-model --overwrite",
    ),
)
@with_options(ExportModelConfig)
def export_model_cmd(
    run: Path = typer.Argument(..., help="Run directory or checkpoint from emseg train, or builtin:NAME."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (TorchScript, ONNX, bioimage.io)."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Export a trained model: TorchScript, ONNX and a bioimage.io package."""
    out = _call(quiet, "export_model", run, output, progress=False, **options)
    _note(quiet, f"wrote {out} (model.pt, model.onnx, emseg-model.json, rdf.yaml)")


@command(
    "augment-preview",
    examples=(
        "emseg augment-preview isbi.zarr -o augment.png",
        "emseg augment-preview isbi.zarr --slice 3 --samples 8 --seed 1 -o augment.png",
    ),
)
@with_options(PreviewConfig)
def augment_preview_cmd(
    data: Path = typer.Argument(..., help="OME-Zarr store with labels/cells."),
    output: Path = typer.Option(Path(PREVIEW_OUTPUT), "--output", "-o", help="PNG to write."),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Draw an image, its mask and several augmented pairs (a check of the augmentation)."""
    _note(quiet, f"wrote {_call(quiet, 'augment_preview', data, output, progress=False, **options)}")


@command(
    "demo",
    examples=(
        "emseg demo",
        "emseg demo --minutes 10 --device cuda -o demo-out",
    ),
)
@with_options(DemoConfig)
def demo_cmd(
    data: Optional[Path] = typer.Option(
        None, "--data", help="Folder with the ISBI 2012 stacks (default: found nearby, else synthetic data)."
    ),
    quiet: bool = QUIET,
    **options: Any,
) -> None:
    """Run the whole flow end to end: ingest, train, predict, evaluate, pictures."""
    result = _call(quiet, "demo", data=data, **options)
    s = result.scores
    table = Table(title=f"emseg demo on {result.data}, {result.device}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("where / value")
    table.add_row("trained", f"{s['epochs']} epochs, {s['steps']} steps from {result.started_from}")
    table.add_row("V_rand (validation)", f"{s['v_rand']:.4f} at threshold {s['v_rand_threshold']:.1f}")
    table.add_row("V_info (validation)", f"{s['v_info']:.4f} at threshold {s['v_info_threshold']:.1f}")
    table.add_row("pixel accuracy", f"{s['pixel_accuracy']:.4f}")
    if result.segmentation:
        from emseg.segmentation.calibrate import describe_settings

        table.add_row(
            "segment settings", f"{describe_settings(result.segmentation['settings'])} (calibrated by the run)"
        )
    if "cells_v_rand" in s:
        table.add_row("V_rand (cells)", f"{s['cells_v_rand']:.4f}, {s['cells_objects']} cells from emseg segment")
    if result.classes:
        c = result.classes
        held = ", ".join(map(str, c["sections"]["held_out"]))
        table.add_row("classes", f"{c['steps']} steps from builtin:membranes on {c['data']}; sections {held} held out")
        for name, score in c["classes"].items():
            table.add_row(f"  IoU {name}", f"{score['iou']:.3f} (Dice {score['dice']:.3f})")
        if c.get("mitochondria_objects"):
            o = c["mitochondria_objects"]
            table.add_row(
                "  mitochondria objects", f"F1 {o['f1']:.3f} (precision {o['precision']:.3f}, recall {o['recall']:.3f})"
            )
    for name, path in result.outputs.items():
        table.add_row(name.replace("_", " "), _shown_path(path))
    stdout.print(table)


def _shown_path(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it (every row alike), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return path


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _tune_zarr() -> None:
    """One zarr codec thread per core (zarr's default, cores + 4, only adds memory)."""
    import zarr

    from emseg.system import available_cpus

    zarr.config.set({"threading.max_workers": max(2, available_cpus())})


def main() -> None:
    """Console entry point: SIGTERM unwinds like Ctrl-C (partial outputs removed, or kept for
    ``--resume``, and one line saying which: :func:`interrupted_line`), exit code 130."""
    signal.signal(signal.SIGTERM, _terminate)
    _tune_zarr()
    try:
        app(prog_name="emseg")  # also under python -m emseg: usage lines and completion name emseg
    except KeyboardInterrupt:  # outside a command (while parsing): nothing was begun
        sys.stderr.write("emseg: interrupted\n")
        sys.exit(130)
