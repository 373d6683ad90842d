"""The one place that asks torch about devices and sets its process-wide backend flags.

``resolve_device("auto")`` picks CUDA when present, else the CPU. Asking for CUDA on a machine
without it is a :class:`BadInputError`, never a silent fallback. :func:`backend_flags` sets the
cuDNN autotuner and TF32 for a block and puts back what was there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from emseg.errors import BadInputError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable ``torch.device``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {spec}: CUDA was requested but no CUDA GPU is available")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are present")
        return device
    raise BadInputError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def cuda_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes bf16 natively (compute capability 8.0, Ampere, or
    newer); ``torch.cuda.is_bf16_supported()`` alone also counts emulation (V100, T4)."""
    if not is_cuda(device) or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (or of the given text); empty where unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); oneDNN emulates bf16 on
    other AVX-512 CPUs, slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ("auto", "fp32" or "bf16") on ``device``; None means
    fp32 (no autocast). "auto" is bf16 where the device computes it natively (CUDA compute
    capability 8.0+, CPUs with AVX512-BF16 or AMX), fp16 on older CUDA GPUs, else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if is_cuda(device):
        return torch.bfloat16 if cuda_native_bf16(device) else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_native_bf16() else None


def device_context(device: torch.device) -> AbstractContextManager:
    """Makes ``device`` the current CUDA device in this thread (streams, events and new tensors
    go there); nothing on the CPU. Each thread that launches CUDA work enters it: the current
    device is per thread and starts at GPU 0."""
    return torch.cuda.device(device) if is_cuda(device) else nullcontext()


def worker_device(spec: str, worker: int, cuda_count: int, share: bool = False) -> str:
    """The device of dask worker number ``worker`` for ``--device spec`` when ``cuda_count`` CUDA
    GPUs are visible: with "auto" or "cuda" each worker gets its own GPU (``cuda:worker %
    cuda_count``); ``share`` (or an explicit "cuda:N", or the CPU) keeps them all on ``spec``.
    Two workers fall on one GPU only when there are more workers than GPUs."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu" or spec.startswith("cuda:") or share or cuda_count <= 0:
        return spec
    if spec in ("auto", "cuda"):
        return f"cuda:{worker % cuda_count}"
    return spec


def device_name(device: torch.device) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _readable(getter: Callable[[], Any]) -> Any:
    """``getter()``, or None where torch refuses to read a setting (a RuntimeError: the program
    mixed its older TF32 flags with the newer ``fp32_precision`` settings)."""
    try:
        return getter()
    except RuntimeError:
        return None


def fp32_precisions() -> list[tuple[Any, str]]:
    """(setting, value) of torch's ``fp32_precision`` for CUDA matmuls and cuDNN (torch >= 2.9)."""
    settings = [
        torch.backends.cuda.matmul,
        getattr(torch.backends.cudnn, "conv", None),
        getattr(torch.backends.cudnn, "rnn", None),
    ]
    return [(s, s.fp32_precision) for s in settings if s is not None and hasattr(s, "fp32_precision")]


@contextmanager
def backend_flags(*, cudnn_benchmark: bool | None = None, tf32: bool | None = None) -> Iterator[None]:
    """Set torch's process-wide speed flags for the block (None leaves one alone) and put back
    what was there before, whatever happens in the block.

    TF32 is switched with torch's long-standing calls (float32 matmul precision "high" and
    ``cudnn.allow_tf32``), which keep its older and newer settings consistent; afterwards the older
    settings are put back (where torch can read them) and then the newer ``fp32_precision`` ones.
    """
    cudnn = torch.backends.cudnn
    benchmark, precisions = cudnn.benchmark, fp32_precisions()
    matmul, conv = _readable(torch.get_float32_matmul_precision), _readable(lambda: cudnn.allow_tf32)
    try:
        if cudnn_benchmark is not None:
            cudnn.benchmark = cudnn_benchmark
        if tf32 is not None:
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            cudnn.allow_tf32 = tf32
        yield
    finally:
        cudnn.benchmark = benchmark
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        if conv is not None:
            cudnn.allow_tf32 = conv
        for setting, value in precisions:
            setting.fp32_precision = value


def synchronize(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
