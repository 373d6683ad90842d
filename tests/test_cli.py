"""CLI habits: progress lines when stderr is not a terminal, silence with --quiet, help that
shows what the parser accepts and two examples per command, shell completion."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from emseg import config as C
from emseg.cli import PlainReporter, interrupted_line, resume_command
from emseg.errors import Interrupted
from emseg.progress import format_duration as _duration

from .conftest import run_emseg
from .test_config import COMMANDS


def test_plain_progress_lines_say_what_how_far_how_fast_and_eta(capsys) -> None:
    reporter = PlainReporter(interval=0)
    reporter.start("predict", total=4, unit="blocks")
    reporter.advance(1, mpix_per_s=2.5)
    reporter.advance(3)
    reporter.finish()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "emseg: predict: started (4 blocks)"
    assert lines[1].startswith("emseg: predict: 1/4 blocks (25%), ") and "ETA" in lines[1] and "2.5 MPix/s" in lines[1]
    assert lines[-1].startswith("emseg: predict: 4/4 blocks (100%)") and lines[-1].endswith(", done")


def test_plain_progress_is_throttled(capsys) -> None:
    reporter = PlainReporter(interval=3600)
    reporter.start("train", total=1000, unit="steps")
    for _ in range(1000):
        reporter.advance(1)
    reporter.finish()
    assert len(capsys.readouterr().err.splitlines()) == 2  # the start and the end, nothing between


def test_durations_read_like_a_clock() -> None:
    assert (_duration(75.4), _duration(3 * 3600 + 300), _duration(float("inf"))) == ("1m15s", "3h05m", "unknown")


@pytest.mark.slow
def test_a_logged_run_prints_progress_lines_and_quiet_silences_it(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    env = {"EMSEG_PROGRESS_INTERVAL": "0"}
    loud = run_emseg("ingest", tmp_path / "s.tif", "-o", tmp_path / "a.zarr", "--voxel-size", "1", "1", "1", env=env)
    assert loud.returncode == 0, loud.stderr
    assert "emseg: ingest s.tif: started (3 slices)" in loud.stderr and "3/3 slices (100%)" in loud.stderr
    quiet = run_emseg(
        "ingest", tmp_path / "s.tif", "-o", tmp_path / "b.zarr", "--voxel-size", "1", "1", "1", "-q", env=env
    )
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.slow
def test_quiet_silences_every_command(tmp_path) -> None:
    """Every command with --quiet writes nothing on stderr (its result may still go to stdout)."""
    import typer.main

    from emseg.cli import app
    from emseg.synthetic import synthetic_stack

    raw, labels = synthetic_stack((4, 64, 64), seed=2)
    tifffile.imwrite(tmp_path / "s.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    t = tmp_path
    tiny = ["--depth", "2", "--base-channels", "4", "--crop", "32", "--batch-size", "2", "--epochs", "1"]
    runs = {
        "ingest": ["ingest", t / "s.tif", "--labels", t / "l.tif", "-o", t / "a.zarr"],  # no voxel size: a warning
        "info": ["info", t / "a.zarr"],
        "models": ["models"],
        "show": ["show", t / "a.zarr", "-o", t / "v.png"],
        "augment-preview": ["augment-preview", t / "a.zarr", "-o", t / "aug.png", "--crop", "32", "--samples", "1"],
        "train": ["train", t / "a.zarr", "-o", t / "run", *tiny, "--steps-per-epoch", "2", "--val-slices", "3"],
        "predict": ["predict", t / "run", t / "a.zarr", "-o", t / "p.zarr", "--tile", "64", "--overlap", "16"],
        "evaluate": ["evaluate", t / "p.zarr", t / "a.zarr", "--json", t / "scores.json"],
        "export": ["export", t / "p.zarr", "-o", t / "p.tif"],
        "export-model": ["export-model", t / "run", "-o", t / "model"],
        "segment": ["segment", t / "p.zarr", "-o", t / "seg.zarr"],
        "bench": ["bench", "--quick", "--no-monai", "--json", t / "bench.json"],
    }
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert commands - set(runs) <= {"demo"}, "a new command needs a --quiet case here"
    env = {"EMSEG_PROGRESS_INTERVAL": "0"}  # a logged run would print progress lines
    for name, args in runs.items():
        if name not in commands:
            continue
        extra = ["--device", "cpu"] if name in ("train", "predict", "bench") else []
        proc = run_emseg(*args, *extra, "--quiet", cwd=tmp_path, env=env)
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stderr == "", (name, proc.stderr)


# --- help -------------------------------------------------------------------------------------


def _commands() -> tuple[Any, Any, dict[str, Any]]:
    """The click group, its context and its commands."""
    import typer.main

    from emseg.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("emseg", ["--help"], resilient_parsing=True)
    return group, ctx, group.commands  # type: ignore[attr-defined]


#: A value for each metavar that is a placeholder rather than a type or a list of choices.
_SAMPLES = {
    "A:B": "0:1", "A:B|I,J,K": "27,28", "NAME=CODES": "cells=1", "DEVICE": "cpu", "MODEL": "builtin:membranes",
    "tcp://HOST:PORT": "tcp://127.0.0.1:8786", "DATA.zarr": "data.zarr", "CLASS": "mito", "NAME": "membranes",
    "DIR": "out", "<int>": "1", "<float>": "0.5", "<str>": "text", "<path>": "some/path",
}  # fmt: skip
#: Other fields an option needs before its config accepts it (checks across fields).
_COMPANIONS: dict[str, dict[str, Any]] = {
    "shards": {"ngff": "0.5", "chunks": (1, 1, 1)},
    "encoder_weights": {"arch": "smp:resnet34"},
    "slices": {"calibrate": "data.zarr"},
}


def _sample(shown: str, nargs: int, default: Any) -> list[str]:
    """What a user would type after the flag, reading the metavar ``shown`` (a number: its
    default where it has one, which is within its bounds)."""
    if shown == "":
        return []
    if shown in ("<int>", "<float>") and default is not None:
        return [str(default)]
    if shown in _SAMPLES:
        return [_SAMPLES[shown]]
    words = shown.split()
    if len(words) == nargs > 1:
        return ["1"] * nargs
    assert "|" in shown, f"no sample for the metavar {shown!r}"
    return [shown.split("|")[0]]


def _required(cmd: Any) -> list[str]:
    """Values for a command's required arguments and options."""
    args = ["x" for p in cmd.params if p.param_type_name == "argument" and p.required]
    for p in cmd.params:
        if p.param_type_name == "option" and p.required:
            args += [p.opts[0], "x"]
    return args


def test_every_option_shows_a_metavar_the_parser_and_the_config_accept() -> None:
    """For every option of every command: a flag shows no value, a tuple its items as typed
    (``Z Y X``, never Typer's ``<float,float,float>...``), and a value made from what the help
    shows parses, and its config takes it."""
    group, root, commands = _commands()
    for name, cmd in commands.items():
        ctx = cmd.make_context(name, [], parent=root, resilient_parsing=True)
        classes = COMMANDS.get(name, ("", ()))[1]
        for p in cmd.get_params(ctx):
            if p.param_type_name != "option" or p.name == "help":
                continue
            shown = p.display_type_rich(ctx)
            where = f"emseg {name} {p.opts[0]}: shows {shown!r}"
            if p.is_flag:
                assert shown == "", where
                continue
            assert "<" not in shown or shown in _SAMPLES, where  # Typer's <a,b,c>... forms
            assert not shown.endswith("..."), where
            typed = _sample(shown, p.nargs, p.default)
            parsed = cmd.make_context(name, [*_required(cmd), p.opts[0], *typed], parent=root)
            value = parsed.params[p.name]
            for cls in classes:
                if p.name in C.user_options(cls):
                    fields = C.options(cls)
                    extra = {k: v for k, v in _COMPANIONS.get(p.name, {}).items() if k in fields}
                    cls(**{p.name: value, **extra})  # raises BadInputError if the config refuses it
    for p in group.get_params(root):
        assert p.display_type_rich(root) == "", p.opts  # --verbose, --version, completion: flags


def _help(cli: Any, *args: str) -> str:
    result = cli(*args, "--help")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture()
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")


def test_help_shows_no_bool_and_no_comma_tuples(cli, wide) -> None:
    _, _, commands = _commands()
    for name in ["", *commands]:
        text = _help(cli, *([name] if name else []))
        assert "<bool>" not in text, name
        assert not re.search(r"<\w+(,\w+)+>", text), name


def test_every_command_help_ends_with_two_examples_that_parse(cli, wide) -> None:
    _, root, commands = _commands()
    for name, cmd in commands.items():
        lines = [line.strip() for line in _help(cli, name).splitlines()]
        examples = [line for line in lines if line.startswith(f"emseg {name} ") or line == f"emseg {name}"]
        assert len(examples) >= 2, (name, examples)
        for example in examples:
            cmd.make_context(name, shlex.split(example)[2:], parent=root)  # its options exist, its values parse


def test_shell_completion_is_on() -> None:
    shown = run_emseg("--show-completion", "bash")
    assert shown.returncode == 0 and "_emseg_completion" in shown.stdout, shown.stderr
    env = {"_EMSEG_COMPLETE": "complete_bash", "COMP_WORDS": "emseg predict --blend li", "COMP_CWORD": "3"}
    completed = run_emseg(env=env)
    assert completed.returncode == 0 and completed.stdout.split() == ["linear"], completed


# --- Ctrl-C -----------------------------------------------------------------------------------


def test_the_interrupted_line_says_what_was_kept_and_how_to_resume() -> None:
    argv = ["predict", "run dir", "d.zarr", "-o", "p.zarr", "--overwrite"]
    assert resume_command(argv) == "emseg predict 'run dir' d.zarr -o p.zarr --overwrite --resume"
    assert resume_command([*argv, "--resume"]).count("--resume") == 1
    kept = Interrupted("3/8 blocks of /x/p.zarr", resumable=True)
    line = interrupted_line(kept, "predict", argv, resumes=True)
    assert line == f"interrupted: kept 3/8 blocks of /x/p.zarr; resume with: {resume_command(argv)}"
    assert "does not resume" in interrupted_line(kept, "demo", ["demo"], resumes=False)
    gone = Interrupted("nothing: the unfinished x.tif was removed", resumable=False)
    assert interrupted_line(gone, "export", ["export"], resumes=False) == f"interrupted: kept {gone.kept}"
    assert interrupted_line(KeyboardInterrupt(), "info", ["info"], resumes=False) == (
        "interrupted; no output was replaced"
    )


def test_an_interrupted_output_says_what_it_kept(tmp_path) -> None:
    from emseg.io.outputs import Output

    with (
        pytest.raises(Interrupted) as caught,
        Output(tmp_path / "o.zarr", overwrite=False, resume_record={"a": 1}) as out,
    ):
        out.expect(5, "blocks")
        (out.done_dir / "0-0-0").touch()
        raise KeyboardInterrupt
    assert caught.value.resumable and caught.value.kept.startswith(f"1/5 blocks of {tmp_path / 'o.zarr'}")
    with pytest.raises(Interrupted) as caught, Output(tmp_path / "o.tif", overwrite=False, kind="file"):
        raise KeyboardInterrupt
    assert not caught.value.resumable and caught.value.kept == "nothing: the unfinished o.tif was removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.zarr.partial"]


def test_an_interrupted_training_run_says_whether_it_can_resume(tmp_path) -> None:
    from emseg.training.run_dir import RESUME_POINT, RunDir

    run = RunDir(tmp_path / "run")
    with pytest.raises(Interrupted) as caught, run.claim(resume=False, overwrite=False):
        raise KeyboardInterrupt
    assert not caught.value.resumable and caught.value.kept.startswith("nothing: the run directory")
    (run.path / RESUME_POINT).write_bytes(b"")
    run.rows = [{"epoch": 0}, {"epoch": 1}]
    with pytest.raises(Interrupted) as caught, run.claim(resume=True, overwrite=False):
        raise KeyboardInterrupt
    assert caught.value.resumable and caught.value.kept.startswith("2 finished epochs in the run directory")


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory) -> dict[str, Path]:
    """40 slices of 128² (one block each) and an untrained tiny network: a prediction of a few
    seconds, to interrupt."""
    import emseg
    from emseg.config import ModelConfig
    from emseg.recipes.bench import untrained_checkpoint
    from emseg.synthetic import synthetic_stack

    d = tmp_path_factory.mktemp("interrupt")
    raw, _ = synthetic_stack((40, 128, 128), seed=4)
    tifffile.imwrite(d / "raw.tif", raw, photometric="minisblack")
    data = emseg.ingest(d / "raw.tif", d / "data.zarr", voxel_size=(50, 4, 4), chunks=(1, 128, 128))
    return {"dir": d, "data": data, "run": untrained_checkpoint(d / "run", ModelConfig(depth=2, base_channels=4))}


def _ctrl_c_when(args: list[str], ready, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``emseg ARGS`` in its own process group and send it Ctrl-C (SIGINT to the group, as a
    terminal does) once ``ready()``; SIGINT is restored to Python's default for it (a test
    runner started in the background may ignore it, and children inherit that)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emseg", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, f"emseg {args[0]} ended before it could be interrupted: {proc.stderr.read()}"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [None, 2], ids=["threads", "local cluster"])
def test_ctrl_c_prints_one_line_with_the_command_that_resumes(slow_store, workers) -> None:
    """Ctrl-C mid-prediction: one line saying what was kept and the exact command that resumes
    (exit code 130, nothing else on stderr, not even from dask's worker processes), and that
    command completes the store."""
    from emseg.io.zarr import open_ome

    d = slow_store["dir"]
    out = f"pred-{workers}.zarr"
    parallel = ["--threads", "1"] if workers is None else ["--workers", str(workers)]
    args = ["predict", "run", "data.zarr", "-o", out, "--tile", "32", "--overlap", "8", "--device", "cpu", *parallel]
    done = d / f".{out}.partial" / "done"
    proc = _ctrl_c_when([*args, "-q"], lambda: done.is_dir() and len(list(done.iterdir())) >= 2, d)
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    said = re.fullmatch(
        r"emseg: interrupted: kept (\d+)/40 blocks of (.+) \(in \S+\); resume with: (emseg .+)", lines[0]
    )
    assert said is not None, lines[0]
    assert 2 <= int(said[1]) <= 40 and said[2] == str(d / out)
    command = shlex.split(said[3])
    assert command == ["emseg", *args, "-q", "--resume"]
    resumed = run_emseg(*command[1:], cwd=d)
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    assert open_ome(d / out).shape == (40, 128, 128) and not (d / f".{out}.partial").exists()


def test_an_oserror_of_the_machine_is_one_line_and_a_bug_keeps_its_traceback(cli, monkeypatch) -> None:
    """The net under the library's own mapping: a full disk or a permission the library did not
    map is one line, exit code 1; an OSError that says emseg is wrong stays a traceback."""
    import errno

    from emseg import api

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.zarr/0/1.2")

    monkeypatch.setattr(api, "info", full)
    result = cli("info", "x.zarr")
    assert result.exit_code == 1 and result.stderr == "emseg: error: /data/out.zarr/0/1.2: No space left on device\n"

    def bug(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(api, "info", bug)
    result = cli("info", "x.zarr")
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EBADF
