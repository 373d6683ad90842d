"""The one place that asks torch about devices.

``resolve_device("auto")`` picks CUDA when present, else the CPU. Asking for CUDA on a machine
without it is a :class:`BadInputError`, never a silent fallback.
"""

from __future__ import annotations

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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (when supported), none on the CPU."""
    if is_cuda(device) and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if is_cuda(device):
        return torch.float16
    return None


def device_name(device: torch.device) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
