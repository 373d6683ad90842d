"""Every command driven with generated bad values of each of its options (hypothesis).

For every parameter of every command (found by walking the CLI, so a new option without bad
values here fails :func:`test_every_option_has_bad_values`), hypothesis draws values a user can
get wrong: text where a number goes, counts below one, NaN and infinity, probabilities outside
[0, 1], unknown choices, paths that are missing, FIFOs, garbage files, outputs nobody can write.
Each run must end with exit code 2, exactly one ``emseg: error:`` line on stderr, no traceback,
and nothing left in the output's folder. Everything the runs print is gathered, and the last test
scans it all for "Traceback".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

#: Every stderr the generated runs printed, for the final scan.
SEEN: list[str] = []

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
NOT_A_NUMBER = st.sampled_from(["abc", "", "1.5.2", "0x10", "--", "1e", "one", "[]"]) | TEXT.filter(
    lambda s: not _is_number(s)
)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _ints(*bad: st.SearchStrategy) -> st.SearchStrategy:
    """Text for an integer option: not a number, or one of ``bad``."""
    return NOT_A_NUMBER | st.one_of(*bad).map(str) if bad else NOT_A_NUMBER


def _floats(*bad: st.SearchStrategy) -> st.SearchStrategy:
    return NOT_A_NUMBER.filter(lambda s: s.lower() not in ("nan", "inf")) | st.one_of(*bad).map(str)


BELOW_ONE = st.integers(max_value=0)
NEGATIVE = st.integers(max_value=-1)
HUGE = st.integers(min_value=2**40, max_value=2**70)
NAN_INF = st.sampled_from(["nan", "inf", "-inf", "NaN"])
OUTSIDE_0_1 = st.floats(min_value=1.0001, max_value=1e30) | st.floats(max_value=-1e-6, min_value=-1e30)
NON_POSITIVE_FLOAT = st.floats(max_value=0, min_value=-1e30, allow_nan=False)


def _choice(*valid: str) -> st.SearchStrategy:
    return TEXT.filter(lambda s: s not in valid and not s.startswith("-"))


def _triples(kind: str) -> st.SearchStrategy:
    """Three values for --chunks/--shards (ints >= 1) or --voxel-size (positive floats), one bad."""
    good = "1" if kind == "int" else "4.0"
    bad = st.sampled_from(["0", "-3", "nan", "inf", "x", "1e400"] + (["2.5"] if kind == "int" else []))
    return st.tuples(bad, st.integers(0, 2)).map(lambda t: [good] * t[1] + [t[0]] + [good] * (2 - t[1]))


class _Path(str):
    """A path the test world holds, named (resolved per run by :func:`_path`)."""


MISSING, FIFO, GARBAGE, FOLDER, USER_FILE, UNDER_FILE, PROC = (
    _Path(n) for n in ("missing", "fifo", "garbage", "folder", "user-file", "under-file", "proc")
)
BAD_INPUT = st.sampled_from([MISSING, FIFO, GARBAGE, FOLDER])
BAD_OUTPUT = st.sampled_from([FIFO, USER_FILE, UNDER_FILE, PROC])
SLICES = st.sampled_from(["5:2", "a:b", "-1:2", "0:100000", "3", ":", "1:1", "0:2:1", "nan:1"]) | NOT_A_NUMBER
DEVICES = _choice("auto", "cpu").filter(lambda s: not s.startswith("cuda")) | st.sampled_from(["cuda:9", "cuda", "gpu"])

#: option (or argument name) -> strategy of bad values; per command where the meaning differs.
BAD: dict[str, st.SearchStrategy] = {
    "--output": BAD_OUTPUT,
    "--labels": BAD_INPUT,
    "--voxel-size": _triples("float"),
    "--chunks": _triples("int"),
    "--shards": _triples("int"),
    "--ngff": _choice("0.4", "0.5"),
    "--series": _ints(NEGATIVE, st.integers(1, 2**70)),
    "--channel": _ints(NEGATIVE, st.integers(1, 2**70)),
    "--slice": _ints(NEGATIVE, st.integers(3, 2**70)),
    "--pred": BAD_INPUT,
    "--level": _ints(NEGATIVE, st.integers(8, 2**70)),
    "--epochs": _ints(BELOW_ONE),
    "--steps-per-epoch": _ints(BELOW_ONE),
    "--batch-size": _ints(BELOW_ONE, HUGE),
    "--crop": _ints(BELOW_ONE, st.integers(2**20, 2**70), st.sampled_from([17, 33, 50])),
    "--lr": _floats(NAN_INF, NON_POSITIVE_FLOAT),
    "--arch": _choice("unet").filter(lambda s: not s.startswith("smp:")) | st.sampled_from(["smp:", "smp:nope"]),
    "--depth": _ints(BELOW_ONE, st.integers(9, 2**70)),
    "--base-channels": _ints(BELOW_ONE, st.integers(1025, 2**70)),
    "--encoder-weights": TEXT.filter(lambda s: not s.startswith("-")),  # meaningless without --arch smp:*
    "--loss": _choice("weighted-bce", "bce", "dice", "bce+dice"),
    "--val-slices": SLICES,
    "--seed": NOT_A_NUMBER | NEGATIVE.map(str) | st.integers(2**63, 2**80).map(str),
    "--time-limit": _floats(NAN_INF, NON_POSITIVE_FLOAT),
    "--device": DEVICES,
    "--precision": _choice("auto", "fp32", "bf16"),
    "--tile": _ints(BELOW_ONE, st.integers(2**20, 2**70), st.sampled_from([30, 31, 33])),
    "--overlap": _ints(NEGATIVE, st.integers(32, 2**70)),
    "--blend": _choice("gaussian", "linear", "crop"),
    "--threshold": _floats(NAN_INF, OUTSIDE_0_1),
    "--dtype": _choice("uint8", "float16", "float32"),
    "--slices": SLICES,
    "--workers": _ints(BELOW_ONE, st.integers(10**4, 2**70)),
    "--threads": _ints(BELOW_ONE),
    "--scheduler": st.sampled_from(["garbage", "file:///etc/passwd", "tcp://localhost", "tcp://127.0.0.1:1", ""]),
    "--normalization": _choice("stack", "checkpoint"),
    "--block": _ints(BELOW_ONE),
    "--into": BAD_INPUT,
    "--mode": _choice("2d", "3d"),
    "--seed-threshold": _floats(NAN_INF, OUTSIDE_0_1),
    "--seeds": _choice("maxima", "cores"),
    "--min-distance": _ints(NEGATIVE),
    "--merge-threshold": _floats(NAN_INF, OUTSIDE_0_1),
    "--min-size": _ints(NEGATIVE),
    "--halo": _ints(NEGATIVE),
    "--json": BAD_OUTPUT,
    "--model": BAD_INPUT,
    "--format": _choice("tif", "ome-tiff", "png"),
    "--samples": _ints(BELOW_ONE, HUGE),
    "--data": BAD_INPUT,
    "--minutes": _floats(NAN_INF, NON_POSITIVE_FLOAT),
    "--classes-minutes": _floats(NAN_INF, st.floats(max_value=-1e-9, min_value=-1e30)),  # 0 skips: valid
    "--components": _floats(NAN_INF, OUTSIDE_0_1),
    "--calibrate": BAD_INPUT,
    "--init": BAD_INPUT,
    "--class": st.sampled_from(["membrane", "=1", "a=b", "a=-1", "9a=1", "a=1,x", "a=", "a=1.5"]),
    "--objects": TEXT.filter(lambda s: not s.startswith("-")),  # the base's prediction has no classes
}
#: Per command, where an option means something else there.
BAD_FOR = {
    ("export", "--labels"): _choice("membranes", "cells"),
    ("augment-preview", "--crop"): _ints(BELOW_ONE, st.integers(2**20, 2**70)),
    ("demo", "--output"): st.sampled_from([FIFO, USER_FILE, UNDER_FILE, PROC]),
}
#: Positional arguments: always inputs.
ARGUMENTS = ("source", "path", "data", "model", "pred", "run")

#: A valid command line per command: (argv with {placeholders}, the input fields it reads).
BASE = {
    "ingest": ["ingest", "{raw}", "-o", "{out}/o.zarr", "--labels", "{lab}"],
    "info": ["info", "{data}"],
    "models": ["models"],
    "show": ["show", "{data}", "-o", "{out}/v.png", "--pred", "{pred}"],
    "train": ["train", "{data}", "-o", "{out}/run", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
              "--crop", "32", "--depth", "2", "--base-channels", "4", "--device", "cpu"],
    "predict": ["predict", "{run}", "{data}", "-o", "{out}/p.zarr", "--tile", "32", "--overlap", "8",
                "--device", "cpu"],
    "segment": ["segment", "{pred}", "-o", "{out}/s.zarr", "--block", "32"],
    "evaluate": ["evaluate", "{pred}", "{data}", "--json", "{out}/e.json"],
    "bench": ["bench", "--device", "cpu", "--quick", "--no-monai", "--model", "{run}", "--json", "{out}/b.json"],
    "export": ["export", "{pred}", "-o", "{out}/x.tif"],
    "export-model": ["export-model", "{run}", "-o", "{out}/m"],
    "augment-preview": ["augment-preview", "{data}", "-o", "{out}/a.png", "--crop", "32", "-n", "1"],
    "demo": ["demo", "-o", "{out}/demo", "--device", "cpu", "--minutes", "0.01"],
}  # fmt: skip


def _commands():
    import typer.main

    from emseg.cli import app

    return typer.main.get_command(app).commands


def _options(command: str) -> list[str]:
    """The non-flag options and the arguments of ``command`` (arguments by name)."""
    out = []
    for p in _commands()[command].params:
        if p.param_type_name == "argument":
            out.append(p.name)
        elif not getattr(p, "is_flag", False) and p.opts[0] not in ("--help",):
            out.append(p.opts[0])
    return out


def _bad(command: str, option: str) -> st.SearchStrategy | None:
    if option in ARGUMENTS:
        return BAD_INPUT
    return BAD_FOR.get((command, option), BAD.get(option))


def test_every_option_has_bad_values():
    missing = [(c, o) for c in _commands() for o in _options(c) if _bad(c, o) is None]
    assert not missing, f"options without generated bad values: {missing}"
    assert set(BASE) == set(_commands()), "every command needs a valid base command line here"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from emseg.synthetic import synthetic_stack
    from tests.test_hostile_input import _world

    root = tmp_path_factory.mktemp("fuzz")
    w = _world(root, synthetic_stack((3, 64, 64), seed=5)[0])
    (root / "garbage.bin").write_bytes(os.urandom(256))
    (root / "folder").mkdir()
    (root / "user.txt").write_text("a user's notes\n")
    os.mkfifo(root / "fifo")
    return {**w, "root": root}


def _path(token: str, world: dict[str, Path], out: Path) -> str:
    root = world["root"]
    return str(
        {
            MISSING: root / "no" / "such.zarr",
            FIFO: root / "fifo",
            GARBAGE: root / "garbage.bin",
            FOLDER: root / "folder",
            USER_FILE: root / "user.txt",
            UNDER_FILE: root / "user.txt" / "out",
            PROC: Path("/proc") / "emseg-out",
        }[token]
    )


def _argv(command: str, option: str, value, world: dict[str, Path], out: Path) -> list[str]:
    fields = {
        "raw": world["raw"], "lab": world["labels"], "data": world["data"], "run": world["run"],
        "pred": world["pred"], "out": out,
    }  # fmt: skip
    # -q: warnings are silenced, so the one line on stderr is the error's
    argv = [a.format(**{k: str(v) for k, v in fields.items()}) for a in BASE[command]] + ["-q"]
    values = value if isinstance(value, list) else [value]
    values = [_path(v, world, out) if isinstance(v, _Path) else v for v in values]
    if option in ARGUMENTS:
        position = [p.name for p in _commands()[command].params if p.param_type_name == "argument"].index(option)
        argv[1 + position] = values[0]
        return argv
    if option in argv:  # replace the base's value
        at = argv.index(option)
        del argv[at : at + 1 + len(values)]
    return [*argv, option, *values]


CASES = [(c, o) for c in BASE for o in _options(c)]


@pytest.mark.parametrize("command, option", CASES)
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_bad_values_are_one_line_exit_2_and_leave_nothing(world, cli, command, option, data):
    value = data.draw(_bad(command, option), label=option)
    out = Path(tempfile.mkdtemp(prefix="fuzz-out-", dir=world["root"]))
    try:
        argv = _argv(command, option, value, world, out)
        result = cli(*argv)
        SEEN.append(result.stderr)
        assert result.exit_code == 2, (argv, result.exit_code, result.output[-2000:])
        message = result.stderr.strip()
        assert message.startswith("emseg: error:") and "\n" not in message, (argv, message[-2000:])
        assert list(out.iterdir()) == [], (argv, sorted(p.name for p in out.iterdir()))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert not (Path("/proc") / "emseg-out").exists()


def test_no_generated_run_printed_a_traceback():
    """The scan of everything the generated runs printed (run after them in file order)."""
    if not SEEN:
        pytest.skip("run together with test_bad_values_are_one_line_exit_2_and_leave_nothing")
    assert not [s for s in SEEN if "Traceback" in s]
    assert np.mean([s.count("\n") for s in SEEN]) == 1.0
