"""Run by tests/test_safety.py in a subprocess: hypothesis-generated checkpoint headers or TIFF
headers, fed to emseg under an address-space limit (RLIMIT_AS) of BOUND bytes above what the
imports took. Every case must end in a correct result or a one-line BadInputError; a
MemoryError (an allocation past the bound) or any other exception fails the run.

    python tests/bounded_fuzz.py checkpoint|tiff EXAMPLES BOUND_BYTES
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import tifffile  # noqa: F401 - imported before the limit
import torch
import zarr  # noqa: F401
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from emseg.config import IngestConfig, ModelConfig, TrainConfig, to_dict
from emseg.errors import BadInputError
from emseg.io.ingest import ingest_stack
from emseg.models.build import build_model
from emseg.models.checkpoint import load_trained


def bounded_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
)


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _limit(bound: int) -> None:
    limit = _vm_bytes() + bound
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# --- checkpoints ----------------------------------------------------------------------------

GOOD = build_model(ModelConfig(depth=2, base_channels=4)).state_dict()

models = st.fixed_dictionaries(
    {},
    optional={
        "arch": st.one_of(st.sampled_from(["unet", "smp:", "smp:nonexistent", "x"]), ANY),
        "depth": st.one_of(st.integers(-2, 64), st.sampled_from([2, 11, 2**31]), ANY),
        "base_channels": st.one_of(st.integers(-2, 10**6), st.sampled_from([4, 8000, 2**31]), ANY),
        "in_channels": st.one_of(st.integers(-1, 10**6), ANY),
        "out_channels": st.one_of(st.integers(-1, 10**6), ANY),
        "encoder_weights": st.one_of(st.none(), st.just("imagenet"), ANY),
    },
)
norms = st.one_of(st.fixed_dictionaries({"mean": st.one_of(st.floats(), ANY), "std": st.one_of(st.floats(), ANY)}), ANY)


@st.composite
def checkpoints(draw: st.DrawFn) -> tuple[dict, dict[str, torch.Tensor]]:
    config = to_dict(TrainConfig())
    config["model"] = {**to_dict(ModelConfig(depth=2, base_channels=4)), **draw(models)}
    if draw(st.booleans()):
        config["model"] = draw(ANY)
    if draw(st.booleans()):
        config[draw(st.sampled_from(["crop", "batch_size", "epochs", "lr", "bogus"]))] = draw(ANY)
    meta = {"config": config, "normalization": draw(norms), "halo": 1, "divisor": 4}
    if draw(st.integers(0, 9)) == 0:
        meta = draw(ANY)
    kind = draw(st.sampled_from(["good", "nan", "other"]))
    if kind == "other":
        tensors = {"w": torch.zeros(draw(st.integers(0, 64)))}
    else:
        tensors = {k: v.clone() for k, v in GOOD.items()}
        if kind == "nan":
            next(iter(tensors.values())).fill_(float("nan"))
    return meta, tensors


def _issue_checkpoint(base_channels: int, depth: int) -> tuple[dict, dict[str, torch.Tensor]]:
    config = to_dict(TrainConfig())
    config["model"].update(base_channels=base_channels, depth=depth)
    meta = {"config": config, "normalization": {"mean": 0.0, "std": 1.0}, "halo": 1, "divisor": 4}
    return meta, {k: v.clone() for k, v in GOOD.items()}


def fuzz_checkpoints(examples: int, work: Path) -> None:
    @bounded_settings(examples)
    @given(checkpoints())
    @example(_issue_checkpoint(8000, 4))  # the issue's checkpoints: base_channels 8000, depth 11
    @example(_issue_checkpoint(64, 11))
    def case(ckpt: tuple[dict, dict[str, torch.Tensor]]) -> None:
        meta, tensors = ckpt
        path = work / "c.safetensors"
        path.write_bytes(save(tensors, metadata={"emseg": json.dumps(meta)}))
        try:
            load_trained(path, "cpu")
        except BadInputError as exc:
            assert "\n" not in str(exc)

    case()


# --- TIFF headers ---------------------------------------------------------------------------


def tiff_bytes(width: int, length: int, bits: int, compression: int, rows: int, pages: int, data: bytes) -> bytes:
    out = bytearray(b"II*\x00" + struct.pack("<I", 0))
    next_at = 4
    for _ in range(pages):
        data_at = len(out)
        out += data
        if len(out) % 2:
            out += b"\x00"
        entries = [
            (256, 4, width),
            (257, 4, length),
            (258, 3, bits),
            (259, 3, compression),
            (262, 3, 1),
            (273, 4, data_at),
            (277, 3, 1),
            (278, 4, rows),
            (279, 4, len(data)),
            (339, 3, 3 if bits in (32, 64) else 1),
        ]
        struct.pack_into("<I", out, next_at, len(out))
        out += struct.pack("<H", len(entries))
        for tag, typ, val in entries:
            out += struct.pack("<HHII", tag, typ, 1, val) if typ == 4 else struct.pack("<HHIHH", tag, typ, 1, val, 0)
        next_at = len(out)
        out += struct.pack("<I", 0)
    return bytes(out)


sides = st.one_of(st.integers(1, 96), st.sampled_from([30000, 65535, 2**20, 2**31 - 1]))
payloads = st.one_of(st.binary(max_size=64), st.integers(0, 2**22).map(lambda n: zlib.compress(b"\x00" * n)))


def fuzz_tiffs(examples: int, work: Path) -> None:
    @bounded_settings(examples)
    @given(
        sides,
        sides,
        st.sampled_from([1, 8, 12, 16, 32, 64]),
        st.sampled_from([1, 5, 7, 8, 32946, 50000]),
        st.one_of(sides, st.just(0)),
        st.integers(1, 4),
        payloads,
    )
    @example(30000, 30000, 32, 8, 30000, 1, zlib.compress(b"\x00" * 2**16))  # the issue's 3.5 MB TIFF, in small
    @example(65535, 65535, 8, 8, 65535, 2, zlib.compress(b"\x00" * 2**16))
    def case(width: int, length: int, bits: int, compression: int, rows: int, pages: int, data: bytes) -> None:
        src = work / "h.tif"
        src.write_bytes(tiff_bytes(width, length, bits, compression, rows, pages, data))
        out = work / "o.zarr"
        shutil.rmtree(out, ignore_errors=True)
        try:
            ingest_stack(src, out, IngestConfig())
        except BadInputError as exc:
            assert "\n" not in str(exc)

    case()


def main() -> None:
    kind, examples, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    np.zeros(1)
    with tempfile.TemporaryDirectory() as tmp:
        _limit(bound)
        (fuzz_checkpoints if kind == "checkpoint" else fuzz_tiffs)(examples, Path(tmp))
    print("bounded: ok")


if __name__ == "__main__":
    main()
