"""The inference engine's control flow, rehearsed on the CPU: late copies, out-of-memory halving,
fixed batch shapes, compile without recompiles, the server thread's device, bounded host buffers,
per-worker devices and the precision choice. Device-independent tests run on every available
device (on a GPU host, on CUDA too)."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import emseg.inference.engine as engine_module
from emseg import device as device_module
from emseg.config import PredictConfig
from emseg.errors import EmsegRuntimeError
from emseg.inference.engine import (
    Engine,
    HostPool,
    HostTransfer,
    Pending,
    is_out_of_memory,
)
from emseg.inference.tiling import plan_block

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP32 = {"precision": "fp32", "dtype": "float32"}


class Tiny(nn.Module):
    """A 3x3 convolution with fixed weights: (B, 1, H, W) -> (B, 1, H, W) logits."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class OOMAbove(nn.Module):
    """``inner``, but raising an out-of-memory error for batches above ``limit`` (as a GPU would)."""

    def __init__(self, inner: nn.Module, limit: int, error: type[Exception] = torch.cuda.OutOfMemoryError) -> None:
        super().__init__()
        self.inner, self.limit, self.error = inner, limit, error
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        self.batches.append(int(x.shape[0]))
        return self.inner(x)


class LateTransfer(HostTransfer):
    """Downloads that complete late, in another thread, as a DMA copy would: reading a host buffer
    before :meth:`wait` returns finds zeros."""

    def download(self, tensors):
        host = [torch.zeros(t.shape, dtype=t.dtype) for t in tensors]
        sources = [t.detach().clone() for t in tensors]

        def copy() -> None:
            time.sleep(0.05)
            with torch.inference_mode():  # the buffers were made in the engine's inference mode
                for h, s in zip(host, sources, strict=True):
                    h.copy_(s.cpu())

        thread = threading.Thread(target=copy)
        thread.start()
        return Pending(host, event=thread)  # this transfer's "event" is the copying thread

    def wait(self, pending):
        pending.event.join()
        return [h.numpy().copy() for h in pending.host]


def _blocks(n: int = 3, seed: int = 0):
    """``n`` blocks of one 96 x 80 slice (several tiles each, tile counts not multiples of 4)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 255, (96, 80)).astype(np.uint8)
    plan = plan_block((0, 96), (0, 80), 32, 8, 4, shape=(96, 80))
    y0, y1, x0, x1 = plan.domain
    from emseg.inference.tiling import read_reflected

    region = read_reflected(lambda r, c: raw[r, c], raw.shape, y0, y1, x0, x1)
    return [(np.roll(region, k, axis=0), plan) for k in range(n)]


def _run(model: nn.Module, device: str, transfer=None, engine_class=Engine, **settings):
    blocks = _blocks()
    opts = {**FP32, "batch_size": 4, **settings}
    with engine_class(
        model, torch.device(device), 100.0, 50.0, PredictConfig(**opts), transfer, max_wait=0.0
    ) as engine:
        futures = [engine.submit(region, plan) for region, plan in blocks]
        results = [f.result(timeout=60) for f in futures]
        return results, engine


def _same(a, b) -> None:
    for (pa, ma), (pb, mb) in zip(a, b, strict=True):
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ma, mb)


# --- one transfer path ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_a_download_that_completes_late_gives_identical_results(device):
    reference, _ = _run(Tiny(), device)
    late, _ = _run(Tiny(), device, transfer=LateTransfer(torch.device(device)))
    _same(reference, late)
    assert np.any(reference[0][0] > 0)  # zeros would mean a buffer was read before its copy


@pytest.mark.parametrize("device", DEVICES)
def test_every_batch_has_the_fixed_shape_even_the_last(device):
    model = OOMAbove(Tiny(), limit=10**6)
    _run(model, device, batch_size=4)
    assert model.batches and set(model.batches) == {4}
    tiles = np.random.default_rng(0).integers(0, 255, (5, 32, 32)).astype(np.uint8)
    with Engine(
        model, torch.device(device), 100.0, 50.0, PredictConfig(**{**FP32, "batch_size": 4}), max_wait=0.0
    ) as engine:
        assert engine.predict_tiles(tiles).shape == (5, 32, 32)
    assert set(model.batches) == {4}


@pytest.mark.parametrize("device", DEVICES)
def test_tta_views_are_channels_last(device):
    seen: list[bool] = []

    class Probe(Tiny):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return super().forward(x)

    _run(Probe(), device, tta=True)
    assert len(seen) >= 8 and all(seen)


def test_the_server_thread_enters_the_engine_device(monkeypatch):
    entered: list[tuple[str, str]] = []
    real = engine_module.device_context

    def spy(device):
        entered.append((threading.current_thread().name, str(device)))
        return real(device)

    monkeypatch.setattr(engine_module, "device_context", spy)
    _run(Tiny(), "cpu")
    assert ("emseg-engine", "cpu") in entered


# --- out of memory --------------------------------------------------------------------------


def test_out_of_memory_is_recognised_in_its_several_forms():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_halving_on_out_of_memory_gives_the_identical_result(device, error):
    reference, _ = _run(Tiny(), device, batch_size=8)
    flaky = OOMAbove(Tiny(), limit=2, error=error)
    if error is RuntimeError:  # how cuDNN reports a failed workspace allocation
        flaky.error = lambda msg: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")  # type: ignore[assignment]
    halved, engine = _run(flaky, device, batch_size=8)
    _same(reference, halved)
    assert engine.batch_size == 2 and set(flaky.batches) == {2}


def test_the_failed_step_is_freed_before_the_cache_is_emptied(monkeypatch):
    held: list[weakref.ref] = []
    alive_at_free: list[bool] = []

    class Heavy(Tiny):
        def forward(self, x):
            activation = torch.ones(x.shape[0], 64, 32, 32)
            held.append(weakref.ref(activation))
            if x.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super().forward(x) + 0 * activation[:, :1]

    def free(device):
        alive_at_free.extend(ref() is not None for ref in held)

    monkeypatch.setattr(engine_module, "free_device_cache", free)
    _run(Heavy(), "cpu", batch_size=8)
    assert alive_at_free and not any(alive_at_free)


def test_out_of_memory_at_batch_size_one_is_a_clear_error():
    with pytest.raises(EmsegRuntimeError, match="smaller --tile"):
        _run(OOMAbove(Tiny(), limit=0), "cpu", batch_size=2)


@pytest.mark.parametrize("failures", [1, 10])
def test_out_of_memory_allocating_a_block_sum_is_caught(failures):
    left = {"n": failures}

    class Tight(Engine):
        def _new_accumulator(self, shape):
            if left["n"] > 0:
                left["n"] -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super()._new_accumulator(shape)

    reference, _ = _run(Tiny(), "cpu")
    if failures == 1:
        got, _ = _run(Tiny(), "cpu", engine_class=Tight)
        _same(reference, got)
    else:
        with pytest.raises(EmsegRuntimeError, match="smaller --block"):
            _run(Tiny(), "cpu", engine_class=Tight)


# --- torch.compile: one shape, one compile ----------------------------------------------------


@pytest.mark.slow
def test_compiled_model_never_recompiles_even_when_halving(monkeypatch):
    import torch._dynamo as dynamo

    compiles = {"n": 0}

    def backend(gm, example_inputs):
        compiles["n"] += 1
        return gm.forward

    dynamo.reset()
    monkeypatch.setattr(dynamo.config, "error_on_recompile", True)
    reference, _ = _run(Tiny(), "cpu", batch_size=8)

    class Flaky(Tiny):  # no side effects: a guard on them would recompile by itself
        def forward(self, x):
            if x.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super().forward(x)

    compiled = torch.compile(Flaky(), backend=backend, dynamic=False)
    got, engine = _run(compiled, "cpu", batch_size=8)  # type: ignore[arg-type]
    dynamo.reset()
    _same(reference, got)
    assert engine.batch_size == 2 and compiles["n"] == 1


# --- host buffers ---------------------------------------------------------------------------


def test_host_pool_reuses_exact_sizes_and_stays_bounded():
    released = []
    pool = HostPool(pinned=False, limit=4096, release=lambda: released.append(1))
    a = pool.take((10, 10), torch.float32)  # 400 bytes
    pool.give(a)
    b = pool.take((100,), torch.float32)  # same bytes, other shape: reused
    assert pool.allocations == 1 and b.shape == (100,)
    pool.give(b)
    c = pool.take((101,), torch.float32)  # another size: a new buffer, never a rounded-up one
    assert pool.allocations == 2 and c.numel() == 101
    pool.give(pool.take((8192,), torch.uint8))  # larger than the limit: never kept
    assert pool.cached_bytes == 400
    for _ in range(12):
        pool.give(torch.empty(1000, dtype=torch.uint8))  # 12 kB given back: the oldest are dropped
    assert pool.cached_bytes <= 4096 and released


@pytest.mark.parametrize("device", DEVICES)
def test_transfer_round_trip(device):
    transfer = HostTransfer(torch.device(device))
    arrays = [np.arange(12, dtype=np.uint8).reshape(3, 4), np.linspace(0, 1, 5, dtype=np.float32)]
    on_device = transfer.upload(transfer.stage(arrays))
    assert all(t.device.type == device for t in on_device)
    back = transfer.wait(transfer.download(on_device))
    for a, b in zip(arrays, back, strict=True):
        np.testing.assert_array_equal(a, b)
    transfer.close()


# --- devices per worker, precision ----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "worker", "count", "expected"),
    [
        ("auto", 0, 4, "cuda:0"),
        ("auto", 3, 4, "cuda:3"),
        ("cuda", 5, 4, "cuda:1"),  # more workers than GPUs: two share one
        ("cuda:2", 1, 4, "cuda:2"),  # an explicit GPU: every worker there (asked for)
        ("cpu", 3, 4, "cpu"),
        ("auto", 2, 0, "auto"),  # no GPU: the CPU, as resolve_device decides
    ],
)
def test_each_worker_gets_its_own_gpu(spec, worker, count, expected):
    assert device_module.worker_device(spec, worker, count) == expected


def test_precision_choice(monkeypatch):
    flags = device_module.cpu_flags("processor : 0\nflags\t\t: fpu avx512f avx512_bf16 sse\n")
    assert device_module.cpu_native_bf16(flags) and not device_module.cpu_native_bf16(frozenset({"avx512f"}))
    cpu = torch.device("cpu")
    assert device_module.autocast_dtype(cpu, "fp32") is None
    assert device_module.autocast_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_native_bf16", lambda flags=None: True)
    assert device_module.autocast_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_native_bf16", lambda flags=None: False)
    assert device_module.autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = torch.device("cuda", 1)
    for capability, dtype in (((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert device_module.autocast_dtype(gpu, "auto") is dtype


def test_a_dask_worker_process_picks_its_gpu(monkeypatch):
    from emseg.inference import blocks

    assert blocks.worker_index() is None and blocks.process_device("auto") == "auto"  # not in a worker
    monkeypatch.setattr(blocks, "worker_index", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert blocks.process_device("cuda") == "cuda:1"
    assert blocks.process_device("cpu") == "cpu"
