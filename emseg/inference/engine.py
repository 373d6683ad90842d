"""Runs tiles through the model in batches, blending on the device.

One :class:`Engine` per process owns the model. Block tasks (threads) :meth:`~Engine.submit` a
block's input region with its :class:`~emseg.inference.tiling.TilePlan`; a server thread uploads
the region once, cuts its tiles on the device, packs tiles of several blocks into batches of
``batch_size`` (always padded to that size: one shape for cuDNN and torch.compile), runs them
(inference mode; autocast per ``precision``; channels_last), and accumulates the weighted
probabilities into the block's buffer on the device. When a block's last tile is in, it is
normalised, converted to the output dtype and the membrane mask, and downloaded asynchronously;
a completion thread waits for the copy and hands the arrays to the waiting task. What it runs
(batch size, TTA, precision, output dtype, threshold, layout) is the prediction's
:class:`~emseg.config.PredictConfig`; nothing about it is declared here again.

Every host/device copy goes through one :class:`HostTransfer` (stage, upload, download, wait), the
same steps on the CPU and on CUDA (pinned buffers, non-blocking copies, an event per download),
so the CPU tests run the engine's real control flow. Out-of-memory errors (also cuDNN/cuBLAS
allocation failures, which arrive as plain RuntimeError) halve the batch size.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from emseg.config import PredictConfig
from emseg.device import autocast_dtype, device_context, is_cuda
from emseg.errors import EmsegRuntimeError
from emseg.inference.tiling import TilePlan

log = logging.getLogger(__name__)

#: Text of the RuntimeErrors that mean "out of device memory": torch's own OutOfMemoryError, and
#: cuDNN / cuBLAS workspace allocation failures, which torch raises as plain RuntimeError.
OOM_MARKERS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


#: Seconds the server waits for more tiles before running a partial batch.
MAX_WAIT_S = 0.002
#: Host staging buffers kept for reuse (exact sizes), at most this many bytes.
HOST_CACHE_BYTES = 2**30


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports a failed device allocation (see :data:`OOM_MARKERS`)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS)


def free_device_cache(device: torch.device) -> None:
    """Give the device's cached free memory back (call it only once the failed step's
    traceback, which holds its activations, is gone)."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 rotations/flips of (..., H, W) (k = 0 is the identity)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


# --- host buffers and transfers -------------------------------------------------------------


class HostPool:
    """Host buffers reused by exact byte size, at most ``limit`` bytes kept.

    torch's pinned-memory allocator rounds every buffer up to a power of two and caches it for the
    life of the process; here a buffer is reused only for the same size, and when the pool would
    exceed ``limit`` the oldest buffers are dropped and ``release`` (torch's host cache flush for
    pinned pools) hands their memory back. A buffer given back with an event is reused only once
    the event has completed (the copy reading it is done)."""

    def __init__(self, pinned: bool, limit: int, release: Callable[[], None] | None = None) -> None:
        self.pinned = pinned
        self.limit = int(limit)
        self.release = release
        self._free: OrderedDict[int, tuple[int, torch.Tensor, Any]] = OrderedDict()  # id -> (nbytes, buf, event)
        self._lock = threading.Lock()
        self.cached_bytes = 0
        self.allocations = 0

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor of ``shape`` and ``dtype`` (contents undefined)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            for key, (size, buf, event) in self._free.items():
                if size == nbytes and (event is None or event.query()):
                    del self._free[key]
                    self.cached_bytes -= size
                    return buf.view(dtype).view(tuple(shape))
        self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned).view(dtype).view(tuple(shape))

    def give(self, tensor: torch.Tensor, event: Any = None) -> None:
        """Keep ``tensor`` (from :meth:`take`) for reuse once ``event`` (if any) has completed."""
        buf = tensor.reshape(-1).view(torch.uint8)
        nbytes = buf.numel()
        if nbytes > self.limit:
            return
        dropped = False
        with self._lock:
            self._free[id(buf)] = (nbytes, buf, event)
            self.cached_bytes += nbytes
            while self.cached_bytes > self.limit:
                _, (size, _, old_event) = self._free.popitem(last=False)
                if old_event is not None:
                    old_event.synchronize()
                self.cached_bytes -= size
                dropped = True
        if dropped and self.release is not None:
            self.release()

    def clear(self) -> None:
        with self._lock:
            for _, _, event in self._free.values():
                if event is not None:
                    event.synchronize()
            self._free.clear()
            self.cached_bytes = 0
        if self.release is not None:
            self.release()


@dataclass
class Pending:
    """A download in flight: host tensors that hold the result once ``event`` has completed."""

    host: list[torch.Tensor]
    event: Any = None


def _release_pinned() -> None:
    empty = getattr(torch._C, "_host_emptyCache", None)  # torch >= 2.5; flushes torch's pinned cache
    if empty is not None:
        empty()


class HostTransfer:
    """How the engine moves data between the host and its device (stage, upload, download, wait):
    on CUDA pinned buffers from a bounded :class:`HostPool`,
    non-blocking copies on the device's current stream and a CUDA event per copy; on the CPU the
    same steps with plain buffers (the upload is the staged tensor itself, a download completes at
    once)."""

    def __init__(self, device: torch.device, host_cache_bytes: int = HOST_CACHE_BYTES) -> None:
        self.device = device
        self.cuda = is_cuda(device)
        self.pool = HostPool(self.cuda, host_cache_bytes, _release_pinned if self.cuda else None)

    def _event(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stage(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        out = []
        with device_context(self.device):  # pinning from a block thread must not touch GPU 0
            for a in arrays:
                src = torch.from_numpy(np.ascontiguousarray(a))
                buf = self.pool.take(src.shape, src.dtype) if self.cuda else torch.empty_like(src)
                out.append(buf.copy_(src))
        return out

    def upload(self, host: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.cuda:
            return host
        on_device = [h.to(self.device, non_blocking=True) for h in host]
        event = self._event()
        for h in host:
            self.pool.give(h, event)  # reused only once this copy has read it
        return on_device

    def download(self, tensors: Sequence[torch.Tensor]) -> Pending:
        if not self.cuda:
            return Pending(list(tensors))
        host = [self.pool.take(t.shape, t.dtype) for t in tensors]
        for h, t in zip(host, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        return Pending(host, self._event())

    def wait(self, pending: Pending) -> list[np.ndarray]:
        if pending.event is not None:
            pending.event.synchronize()
        arrays = [h.numpy().copy() for h in pending.host]
        if self.cuda:
            for h in pending.host:
                self.pool.give(h)
        return arrays

    def close(self) -> None:
        self.pool.clear()


# --- the engine -----------------------------------------------------------------------------


@dataclass(eq=False)  # blocks are tracked by identity
class _InFlight:
    plan: TilePlan
    staged: list[torch.Tensor]  # raw region (Hd, Wd), wy (n_y, tile), wx (n_x, tile), sy (h,), sx (w,)
    future: Future
    #: (mean, std) of this block's slice (predict's per-slice normalisation); None: the engine's.
    norm: tuple[float, float] | None = None
    region: Any = None  # (Hd, Wd) raw on the device
    wy: Any = None  # (n_y, tile) float32 window weights
    wx: Any = None
    sy: Any = None  # (block_h,) float32 sums of the y windows (TilePlan.weight_sums)
    sx: Any = None
    acc: torch.Tensor | None = None  # (Hd, Wd) float32 weighted sum of probabilities
    pending: deque = field(default_factory=deque)  # tiles not yet batched
    remaining: int = 0


class Engine:
    """A model on a device with its intensity normalisation, serving blocks of tiles."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        mean: float,
        std: float,
        config: PredictConfig | None = None,
        transfer: HostTransfer | None = None,
        *,
        max_wait: float = MAX_WAIT_S,
    ) -> None:
        settings = config if config is not None else PredictConfig()
        self.device = device
        self.settings = settings
        self.max_wait = max_wait
        self.mean, self.std = float(mean), float(std)
        self.transfer: HostTransfer = transfer or HostTransfer(device, HOST_CACHE_BYTES)
        with device_context(device):
            self.model = model.to(device).eval()
        #: 1: P(cell) (sigmoid); C > 1: one probability per class (softmax), (C, h, w) blocks.
        self.channels = int(getattr(model, "out_channels", 1))
        self._channels_last = settings.channels_last  # faster on CUDA and on oneDNN CPUs alike
        if self._channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # A compiled model runs one batch shape: the batch size is settled on the eager network
        # first (out-of-memory halvings happen there), then the compiled one sees only that shape.
        eager = getattr(self.model, "_orig_mod", None)
        self._eager: nn.Module | None = eager if isinstance(eager, nn.Module) else None
        self._amp = autocast_dtype(device, settings.precision) if settings.amp else None
        self.batch_size = max(1, int(settings.batch_size))
        self._inbox: queue.Queue[_InFlight | None] = queue.Queue()
        self._done: queue.Queue[tuple | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._failing = threading.Lock()  # the server's failure path against submit's queueing
        self._closing = False
        self._unfinished: set[_InFlight] = set()  # started, result not yet handed over
        self._server = threading.Thread(target=self._serve, name="emseg-engine", daemon=True)
        self._finisher = threading.Thread(target=self._finish_loop, name="emseg-engine-out", daemon=True)
        self._server.start()
        self._finisher.start()
        self._closed = False

    # --- public -----------------------------------------------------------------------------

    def submit(self, region: np.ndarray, plan: TilePlan, norm: tuple[float, float] | None = None) -> Future:
        """Queue a block: ``region`` (Hd, Wd) is the input over ``plan.domain``, normalised by
        ``norm`` (mean, std) or else the engine's. The future gives (probabilities (h, w) in the
        output dtype, membranes (h, w) uint8), or with C > 1 classes ((C, h, w) probabilities,
        (h, w) uint8 most probable class numbered from 1); after a failure of the model, that
        failure."""
        future: Future = Future()
        if self._error is not None:
            future.set_exception(EmsegRuntimeError(f"inference failed: {self._error}"))
            return future
        sy, sx = plan.weight_sums()
        arrays = [region, *(w.astype(np.float32) for w in (plan.y_windows, plan.x_windows, sy, sx))]
        norm = None if norm is None else (float(norm[0]), float(norm[1]))
        staged = self.transfer.stage(arrays)
        # with the server's failure path locked out: a block queued after the server failed and
        # emptied its inbox would wait forever; one that comes later fails as the others did
        with self._failing:
            if self._error is None:
                self._inbox.put(_InFlight(plan=plan, staged=staged, future=future, norm=norm))
                return future
        future.set_exception(EmsegRuntimeError(f"inference failed: {self._error}"))
        return future

    def run_block(
        self, region: np.ndarray, plan: TilePlan, norm: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(region, plan, norm).result()

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(N, T, T) raw tiles -> (N, T, T) float32 P(cell), no blending (for tests and bench)."""
        out = []
        with device_context(self.device), torch.inference_mode():
            for i in range(0, len(tiles), self.batch_size):
                (x,) = self.transfer.upload(self.transfer.stage([tiles[i : i + self.batch_size]]))
                (p,) = self.transfer.wait(self.transfer.download([self._forward_safe(x)]))
                out.append(p)
        return np.concatenate(out)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(None)
            self._server.join()
            self._finisher.join()
            self.transfer.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model ------------------------------------------------------------------------------

    def _forward(
        self, raw: torch.Tensor, net: nn.Module | None = None, norm: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, T, T) raw tiles on the device -> (B, T, T) P(cell) float32, or (B, C, T, T) class
        probabilities with C > 1 channels; ``norm``: (B,) means and stds, one per tile, else the
        engine's."""
        net = self.model if net is None else net
        if norm is None:
            x = ((raw.float() - self.mean) / self.std).unsqueeze(1)
        else:
            x = ((raw.float() - norm[0][:, None, None]) / norm[1][:, None, None]).unsqueeze(1)
        views = range(8) if self.settings.tta else (0,)
        total = None
        for k in views:
            xk = dihedral(x, k) if k else x
            if self._channels_last:  # rot90 and flip return other strides: every view in one layout
                xk = xk.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self._amp, enabled=self._amp is not None):
                logits = net(xk)
            z = logits.float()
            z = dihedral_inverse(z, k) if k else z
            total = z if total is None else total + z
        assert total is not None
        # TTA averages logits, not probabilities (a view that is sure of a thin membrane outweighs
        # unsure ones): measured on ISBI 27-29, equal for trained models, +0.004 V_rand for a young one
        if self.channels == 1:
            return torch.sigmoid(total[:, 0] / len(views))
        return torch.softmax(total / len(views), dim=1)

    def _padded(self, raw: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(n, ...) -> (batch_size, ...) with ``fill`` entries after the n real ones: one shape always."""
        if len(raw) == self.batch_size:
            return raw
        return torch.cat([raw, raw.new_full((self.batch_size - len(raw), *raw.shape[1:]), fill)])

    def _shrink(self) -> None:
        """Halve the batch size after an out-of-memory error (its traceback already dropped)."""
        if self.batch_size == 1:
            raise EmsegRuntimeError("out of device memory even with batch size 1; use a smaller --tile")
        free_device_cache(self.device)
        self.batch_size = max(1, self.batch_size // 2)
        log.warning("out of device memory: continuing with batch size %d", self.batch_size)

    def _forward_safe(self, raw: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`_forward` over (N, T, T) tiles (``norm``: their (N,) means and stds) in batches
        of ``batch_size`` (each padded to it), halving the batch size on out-of-memory errors; the
        result does not depend on it."""
        if self._eager is not None:  # settle the batch size before the compiled network runs
            self._settle(raw[:1])
        out = []
        i = 0
        while i < len(raw):
            chunk = raw[i : i + self.batch_size]
            part = None
            if norm is not None:
                part = (
                    self._padded(norm[0][i : i + self.batch_size], self.mean),
                    self._padded(norm[1][i : i + self.batch_size], self.std),
                )
            try:
                out.append(self._forward(self._padded(chunk), norm=part)[: len(chunk)])
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
            else:
                i += len(chunk)
                continue
            self._shrink()  # outside the except clause: the failed step's frames are freed
        return out[0] if len(out) == 1 else torch.cat(out)

    def _settle(self, tile: torch.Tensor) -> None:
        """Run the eager network once on a full batch (halving on out-of-memory), then never again."""
        eager, self._eager = self._eager, None
        assert eager is not None
        while True:
            try:
                self._forward(tile.expand(self.batch_size, *tile.shape[1:]), eager)
                return
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
            self._shrink()

    def _allocate(self, make: Callable[[], Any]) -> Any:
        """``make()``, tried once more after freeing the device's cache on out-of-memory."""
        for attempt in range(2):
            try:
                return make()
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
            if attempt == 0:
                free_device_cache(self.device)
        raise EmsegRuntimeError("out of device memory for one block's input and sums; use a smaller --block")

    def _new_accumulator(self, shape: tuple[int, int]) -> torch.Tensor:
        full = shape if self.channels == 1 else (self.channels, *shape)
        return torch.zeros(full, dtype=torch.float32, device=self.device)

    # --- server -----------------------------------------------------------------------------

    def _serve(self) -> None:  # noqa: C901 - the server's one loop owns the batch state; split, its invariants would span functions
        active: deque[_InFlight] = deque()
        try:
            # The current CUDA device is per thread and starts at 0: on cuda:N this thread's
            # streams, events and allocations must be on GPU N.
            with device_context(self.device), torch.inference_mode():
                while True:
                    if not active:
                        block = self._inbox.get()
                        if block is None:
                            break
                        self._start(block, active)
                    self._drain_inbox(active, wait=False)
                    if sum(len(b.pending) for b in active) < self.batch_size:
                        self._drain_inbox(active, wait=True)
                    batch: list[tuple[_InFlight, tuple[int, int, int, int]]] = []
                    while active and len(batch) < self.batch_size:
                        block = active[0]
                        while block.pending and len(batch) < self.batch_size:
                            batch.append((block, block.pending.popleft()))
                        if not block.pending:
                            active.popleft()
                    if batch:
                        self._run_batch(batch)
                    if self._closing and not active:
                        break
        except BaseException as exc:  # noqa: BLE001 - not swallowed: handed to every waiting task, which re-raises it
            with self._failing:  # no block is queued after the inbox is emptied here
                self._error = exc
                waiting = list(self._unfinished)
                while True:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        waiting.append(item)
            for block in waiting:  # started ones too, even if all their tiles left `active`
                try:
                    block.future.set_exception(exc)
                except InvalidStateError:  # its result was just handed over
                    pass
        finally:
            self._done.put(None)

    def _drain_inbox(self, active: deque, wait: bool) -> None:
        timeout = self.max_wait if wait else 0
        while True:
            try:
                block = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
            except queue.Empty:
                return
            if block is None:
                self._closing = True
                return
            self._start(block, active)
            timeout = 0

    def _start(self, block: _InFlight, active: deque) -> None:
        self._unfinished.add(block)
        block.region, block.wy, block.wx, block.sy, block.sx = self._allocate(
            lambda: self.transfer.upload(block.staged)
        )
        block.staged = []
        dy0, dy1, dx0, dx1 = block.plan.domain
        block.acc = self._allocate(lambda: self._new_accumulator((dy1 - dy0, dx1 - dx0)))
        block.pending = deque(block.plan.tiles())
        block.remaining = len(block.pending)
        active.append(block)

    def _run_batch(self, batch: Sequence[tuple[_InFlight, tuple[int, int, int, int]]]) -> None:
        t = batch[0][0].plan.tile
        tiles = []
        for block, (_, _, y, x) in batch:
            oy, ox = y - block.plan.domain[0], x - block.plan.domain[2]
            tiles.append(block.region[oy : oy + t, ox : ox + t])
        norm = None
        if any(block.norm is not None for block, _ in batch):
            pairs = [block.norm or (self.mean, self.std) for block, _ in batch]
            norm = (
                torch.tensor([m for m, _ in pairs], dtype=torch.float32, device=self.device),
                torch.tensor([s for _, s in pairs], dtype=torch.float32, device=self.device),
            )
        prob = self._forward_safe(torch.stack(tiles), norm)
        for (block, (iy, ix, y, x)), p in zip(batch, prob, strict=True):
            assert block.acc is not None
            w = block.wy[iy, :, None] * block.wx[ix, None, :]
            oy, ox = y - block.plan.domain[0], x - block.plan.domain[2]
            block.acc[..., oy : oy + t, ox : ox + t].addcmul_(p, w)
            block.remaining -= 1
            if block.remaining == 0:
                self._complete(block)

    def _complete(self, block: _InFlight) -> None:
        self._unfinished.discard(block)
        plan = block.plan
        y0, y1, x0, x1 = plan.block
        dy0, dy1, dx0, dx1 = plan.domain
        oy, ox = y0 - dy0, x0 - dx0
        assert block.acc is not None
        prob = block.acc[..., oy : oy + y1 - y0, ox : ox + x1 - x0] / (block.sy[:, None] * block.sx[None, :])
        if not bool(torch.isfinite(prob).all()):  # never silently wrong: uint8 would hide NaN as 0
            block.acc = block.region = block.wy = block.wx = block.sy = block.sx = None
            block.future.set_exception(
                EmsegRuntimeError(
                    f"block {plan.block}: the network produced NaN or infinite probabilities "
                    "(non-finite input values, or a corrupt checkpoint); nothing of this block was written"
                )
            )
            return
        if self.channels == 1:
            membranes = (prob < self.settings.threshold).to(torch.uint8)
        else:  # the most probable class, numbered from 1
            membranes = (prob.argmax(0) + 1).to(torch.uint8)
        if self.settings.dtype == "uint8":
            out = torch.round(prob.clamp(0, 1) * 255).to(torch.uint8)
        else:
            out = prob.to(getattr(torch, self.settings.dtype))
        block.acc = block.region = block.wy = block.wx = block.sy = block.sx = None
        self._done.put((block.future, self.transfer.download([out, membranes])))

    def _finish_loop(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            future, pending = item
            try:
                out, mask = self.transfer.wait(pending)
                future.set_result((out, mask))
            except BaseException as exc:  # noqa: BLE001 - not swallowed: the waiting task re-raises it
                future.set_exception(exc)
