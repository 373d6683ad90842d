"""Runs tiles through the model in batches, blending on the device.

One :class:`Engine` per process owns the model. Block tasks (threads) :meth:`~Engine.submit` a
block's input region with its :class:`~emseg.inference.tiling.TilePlan`; a server thread uploads
the region once (pinned memory, non-blocking copy), cuts its tiles on the device, packs tiles of
several blocks into batches of ``batch_size``, runs them (inference mode; bf16 autocast and
channels_last), and accumulates the weighted probabilities into the block's buffer on the
device. When a block's last tile is in, it is normalised, converted to the output dtype and the
membrane mask, and copied back asynchronously; a completion thread hands it to the waiting task.
Reading, decompression and writing in the block tasks thus overlap the device's work.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from emseg.device import autocast_dtype, is_cuda
from emseg.errors import EmsegRuntimeError
from emseg.inference.tiling import TilePlan

log = logging.getLogger(__name__)

OUTPUT_DTYPES = ("uint8", "float16", "float32")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs the model (the rest comes from the checkpoint)."""

    batch_size: int = 8
    tta: bool = False
    output_dtype: str = "uint8"
    threshold: float = 0.5
    channels_last: bool = True
    autocast: bool = True
    #: Seconds the server waits for more tiles before running a partial batch.
    max_wait: float = 0.002


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 rotations/flips of (..., H, W) (k = 0 is the identity)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


@dataclass(eq=False)  # blocks are tracked by identity
class _Block:
    plan: TilePlan
    region: torch.Tensor  # (Hd, Wd) raw, pinned on the host, then on the device
    wy: torch.Tensor  # (n_y, tile) float32 weights
    wx: torch.Tensor  # (n_x, tile)
    sy: torch.Tensor  # (block_h,) float32 sums of the y windows (TilePlan.weight_sums)
    sx: torch.Tensor  # (block_w,)
    future: Future
    acc: torch.Tensor | None = None  # allocated when the block's first tile is run
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
        settings: EngineSettings = EngineSettings(),
    ) -> None:
        if settings.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output dtype must be one of {OUTPUT_DTYPES}")
        self.device = device
        self.settings = settings
        self.mean, self.std = float(mean), float(std)
        self.model = model.to(device).eval()
        self._channels_last = settings.channels_last  # faster on CUDA and on oneDNN CPUs alike
        if self._channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._amp = autocast_dtype(device) if settings.autocast else None
        self.batch_size = max(1, int(settings.batch_size))
        self._inbox: queue.Queue[_Block | None] = queue.Queue()
        self._done: queue.Queue[tuple | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._closing = False
        self._unfinished: set[_Block] = set()  # started, result not yet handed over
        self._server = threading.Thread(target=self._serve, name="emseg-engine", daemon=True)
        self._finisher = threading.Thread(target=self._finish_loop, name="emseg-engine-out", daemon=True)
        self._server.start()
        self._finisher.start()
        self._closed = False

    # --- public -----------------------------------------------------------------------------

    def submit(self, region: np.ndarray, plan: TilePlan) -> Future:
        """Queue a block: ``region`` (Hd, Wd) is the input over ``plan.domain``. The future gives
        (probabilities (h, w) in the output dtype, membranes (h, w) uint8)."""
        if self._error is not None:
            raise EmsegRuntimeError(f"inference failed: {self._error}")
        future: Future = Future()
        sy, sx = plan.weight_sums()
        tensors = [
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (region, *(w.astype(np.float32) for w in (plan.y_windows, plan.x_windows, sy, sx)))
        ]
        if is_cuda(self.device):  # pinned host memory: the upload overlaps the device's work
            tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in tensors]
        region_t, wy, wx, sy_t, sx_t = tensors
        self._inbox.put(_Block(plan=plan, region=region_t, wy=wy, wx=wx, sy=sy_t, sx=sx_t, future=future))
        return future

    def run_block(self, region: np.ndarray, plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(region, plan).result()

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(N, T, T) raw tiles -> (N, T, T) float32 P(cell), no blending (for tests and bench)."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(tiles), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(tiles[i : i + self.batch_size])).to(self.device)
                out.append(self._forward(x).float().cpu().numpy())
        return np.concatenate(out)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(None)
            self._server.join()
            self._finisher.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model ------------------------------------------------------------------------------

    def _forward(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, T, T) raw tiles on the device -> (B, T, T) P(cell) float32."""
        x = ((raw.float() - self.mean) / self.std).unsqueeze(1)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = range(8) if self.settings.tta else (0,)
        prob = None
        for k in views:
            xk = dihedral(x, k) if k else x
            with torch.autocast(self.device.type, dtype=self._amp, enabled=self._amp is not None):
                logits = self.model(xk)
            p = torch.sigmoid(logits.float())[:, 0]
            p = dihedral_inverse(p, k) if k else p
            prob = p if prob is None else prob + p
        assert prob is not None
        return prob / len(views)

    def _forward_safe(self, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward`, halving the batch on CUDA out-of-memory errors (and saying so)."""
        while True:
            try:
                if len(raw) <= self.batch_size:
                    return self._forward(raw)
                return torch.cat(
                    [self._forward(raw[i : i + self.batch_size]) for i in range(0, len(raw), self.batch_size)]
                )
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise EmsegRuntimeError("out of GPU memory even with batch size 1; use a smaller --tile") from None
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("out of GPU memory: continuing with batch size %d", self.batch_size)

    # --- server -----------------------------------------------------------------------------

    def _serve(self) -> None:
        active: deque[_Block] = deque()
        try:
            with torch.inference_mode():
                while True:
                    if not active:
                        block = self._inbox.get()
                        if block is None:
                            break
                        self._start(block, active)
                    self._drain_inbox(active, wait=False)
                    if sum(len(b.pending) for b in active) < self.batch_size:
                        self._drain_inbox(active, wait=True)
                    batch: list[tuple[_Block, tuple[int, int, int, int]]] = []
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
        timeout = self.settings.max_wait if wait else 0
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

    def _start(self, block: _Block, active: deque) -> None:
        block.region = block.region.to(self.device, non_blocking=True)
        block.wy = block.wy.to(self.device, non_blocking=True)
        block.wx = block.wx.to(self.device, non_blocking=True)
        block.sy = block.sy.to(self.device, non_blocking=True)
        block.sx = block.sx.to(self.device, non_blocking=True)
        block.pending = deque(block.plan.tiles())
        block.remaining = len(block.pending)
        active.append(block)
        self._unfinished.add(block)

    def _run_batch(self, batch: Sequence[tuple[_Block, tuple[int, int, int, int]]]) -> None:
        t = batch[0][0].plan.tile
        tiles = []
        for block, (_, _, y, x) in batch:
            oy, ox = y - block.plan.domain[0], x - block.plan.domain[2]
            tiles.append(block.region[oy : oy + t, ox : ox + t])
        batch_tiles = torch.stack(tiles)
        if len(tiles) < self.batch_size and is_cuda(self.device):  # a fixed shape for cudnn and compile
            pad = batch_tiles.new_zeros((self.batch_size - len(tiles), t, t))
            batch_tiles = torch.cat([batch_tiles, pad])
        prob = self._forward_safe(batch_tiles)[: len(tiles)]
        for (block, (iy, ix, y, x)), p in zip(batch, prob, strict=True):
            if block.acc is None:
                dy0, dy1, dx0, dx1 = block.plan.domain
                block.acc = torch.zeros((dy1 - dy0, dx1 - dx0), dtype=torch.float32, device=self.device)
            w = block.wy[iy, :, None] * block.wx[ix, None, :]
            oy, ox = y - block.plan.domain[0], x - block.plan.domain[2]
            block.acc[oy : oy + t, ox : ox + t].addcmul_(p, w)
            block.remaining -= 1
            if block.remaining == 0:
                self._complete(block)

    def _complete(self, block: _Block) -> None:
        self._unfinished.discard(block)
        plan = block.plan
        y0, y1, x0, x1 = plan.block
        dy0, dy1, dx0, dx1 = plan.domain
        oy, ox = y0 - dy0, x0 - dx0
        assert block.acc is not None
        prob = block.acc[oy : oy + y1 - y0, ox : ox + x1 - x0] / (block.sy[:, None] * block.sx[None, :])
        membranes = (prob < self.settings.threshold).to(torch.uint8)
        if self.settings.output_dtype == "uint8":
            out = torch.round(prob.clamp(0, 1) * 255).to(torch.uint8)
        else:
            out = prob.to(getattr(torch, self.settings.output_dtype))
        block.acc = None
        block.region = None  # type: ignore[assignment]
        if is_cuda(self.device):
            host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host_mask = torch.empty(membranes.shape, dtype=torch.uint8, pin_memory=True)
            host_out.copy_(out, non_blocking=True)
            host_mask.copy_(membranes, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._done.put((block.future, host_out, host_mask, event))
        else:
            self._done.put((block.future, out, membranes, None))

    def _finish_loop(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            future, out, mask, event = item
            try:
                if event is not None:
                    event.synchronize()
                future.set_result((out.numpy().copy(), mask.numpy().copy()))
            except BaseException as exc:  # noqa: BLE001 - not swallowed: the waiting task re-raises it
                future.set_exception(exc)
