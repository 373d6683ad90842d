"""DistributedDataParallel set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from emseg.device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on the CPU, NCCL on CUDA) and pick this
    rank's device; a single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_spec)
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = rank_device(info.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":  # device_id binds NCCL's communicator to this rank's GPU now
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return info, device


def rank_device(local_rank: int, visible: int) -> torch.device:
    """This rank's GPU among the ``visible`` ones: ``cuda:local_rank`` when the rank sees every
    GPU of its node, ``cuda:0`` when a launcher gives each rank its own (CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda", local_rank % max(1, visible))


def max_across(values: list[float], info: Dist, device: torch.device) -> list[float]:
    """The largest of each value over the ranks (one all-reduce; ``values`` as given in a single
    process, where nothing waits for the device)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (to check that ranks agree)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(model: nn.Module, info: Dist) -> list[str]:
    digest = weights_digest(model)
    if not info.enabled:
        return [digest]
    out: list[str] = [""] * info.world
    dist.all_gather_object(out, digest)
    return out


def sync_buffers(model: nn.Module, info: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per rank)."""
    if info.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
