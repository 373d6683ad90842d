"""Joint, batched, on-device augmentation of image, label and weight map.

Every sample of a batch gets its own random transform, applied jointly to its image, label
and weight map:

* a random element of the dihedral group (90-degree rotation and flip), if ``config.flips``;
* with probability ``config.affine_p``, an affine map: rotation uniform in
  ``[-rotate, rotate]`` degrees, isotropic scale log-uniform in ``config.scale``, shear uniform
  in ``[-shear, shear]`` degrees, translation uniform in ``[-translate, translate] * out_size``
  pixels per axis;
* with probability ``config.elastic_p``, an elastic deformation (Simard et al. 2003): a
  displacement field uniform in [-1, 1] per pixel and axis, smoothed by a Gaussian of
  ``sigma`` pixels (uniform in ``config.elastic_sigma``; separable float32 convolution on the
  device, kernel truncated at 3 sigma and normalised to sum 1) and scaled by ``alpha`` pixels
  (uniform in ``config.elastic_alpha``);
* on the image only, what differs between imaging sessions: with probability ``config.blur_p``
  a Gaussian blur (sigma uniform in ``config.blur_sigma`` pixels, reflected at the borders),
  with probability ``config.gamma_p`` a gamma change (exponent log-uniform in ``config.gamma``,
  applied to the sample's own [min, max] range), with probability ``config.intensity_p``, contrast (factor uniform in
  ``config.contrast``, about the sample's mean) and brightness (offset uniform in
  ``[-brightness, brightness]``) jitter, then with probability ``config.noise_p`` additive
  Gaussian noise of standard deviation uniform in ``config.noise_std``.

All geometric transforms compose into **one** sampling grid per sample: output pixel ``p``
(pixels, relative to the output centre) reads input position

    q = c + t + A @ D @ p + alpha * smooth(noise)(p)

with ``c`` the centre of the input's central ``out_size`` crop, ``D`` the dihedral matrix,
``A`` the affine matrix and ``t`` the translation (the elastic displacement is in input
pixels). ``A`` maps output to input coordinates, so a scale ``s`` shows structures ``1/s`` as
large; the log-uniform range is symmetric in this respect for the default (0.8, 1.25). Each
tensor is then resampled by a single batched ``grid_sample`` call: image and
weight map bilinear, label nearest (so it stays binary), ``padding_mode="reflection"``. The
weight map is also clamped to each sample's input [min, max] so that rounding never leaves it.

The caller cuts input patches larger than the output (see :func:`context_size`) so that
rotations and displacements read real pixels; the output is the transformed centre region.
With a geometry-free config (flips off, ``affine_p == elastic_p == 0``) the output is the
exact centre crop, without resampling.

Randomness: every random number comes from the explicit ``torch.Generator``, drawn in a fixed
order, so the same generator state and config give the same output (bit-identical on the CPU;
on CUDA up to the determinism of the CUDA kernels). The generator may live on the tensors'
device (recommended for CUDA: nothing then crosses the bus) or on the CPU (the draws are
then copied to the device). The hot path has no ``.item()``/host synchronisation: per-sample
choices are applied with ``torch.where`` and multiplicative gates, never with Python branches
on tensor values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from emseg.config import AugmentConfig

#: Elastic smoothing kernels are truncated at this many sigmas.
_TRUNCATE = 3.0

# Columns of the per-sample uniform draws (one torch.rand call of shape (B, _N_UNIFORM)).
(
    _ROT90,
    _FLIP,
    _AFFINE_GATE,
    _ANGLE,
    _SCALE,
    _SHEAR,
    _TX,
    _TY,
    _ELASTIC_GATE,
    _ALPHA,
    _SIGMA,
    _INTENSITY_GATE,
    _BRIGHTNESS,
    _CONTRAST,
    _NOISE_GATE,
    _NOISE_STD,
) = range(16)
_N_UNIFORM = 16


def identity_config() -> AugmentConfig:
    """An :class:`AugmentConfig` that changes nothing: the output is the exact centre crop."""
    return AugmentConfig(
        flips=False, affine_p=0.0, elastic_p=0.0, intensity_p=0.0, noise_p=0.0, gamma_p=0.0, blur_p=0.0
    )


def _elastic_radius(config: AugmentConfig) -> int:
    """Half-width in pixels of the (truncated) elastic smoothing kernel."""
    return int(math.ceil(_TRUNCATE * max(config.elastic_sigma)))


def _elastic_margin(config: AugmentConfig) -> float:
    """About 3 standard deviations of one displacement component, in pixels, at the largest
    alpha and smallest sigma: smoothing iid U[-1, 1] noise (variance 1/3) by a normalised 2-D
    Gaussian of sigma s leaves a standard deviation sqrt(1/3) / (2 sqrt(pi) s)."""
    if config.elastic_p <= 0:
        return 0.0
    alpha = max(config.elastic_alpha)
    sigma = max(min(config.elastic_sigma), 0.5)  # sigma -> 0 is unsmoothed noise: |d| <= alpha
    std = math.sqrt(1.0 / 3.0) / (2.0 * math.sqrt(math.pi) * sigma)
    return alpha * min(3.0 * std, 1.0)


def context_size(out_size: int, config: AugmentConfig) -> int:
    """Side of the input patch the caller should cut for ``out_size`` outputs.

    It covers the output's footprint for the largest rotation (up to 45 degrees, the worst
    case) together with the largest scale, plus the full translation and a 3-standard-deviation
    elastic margin on every side (shear is left to that margin). With the defaults this is
    about 1.98 * out_size: 508 for out_size 256, which still fits a 512 x 512 ISBI slice, and
    no sample out of 2400 drawn with the defaults read outside it (measured: at 480 px 0.5 %
    of samples did, by at most 12 px; at 448 px 4 %; at 1.5 * out_size = 384 px 23 %, by up
    to 60 px). The result has the same parity as ``out_size`` (so the centre crop is
    pixel-aligned) and is never smaller. A caller whose images are smaller may cut less:
    sampling beyond the patch reflects.
    """
    if out_size < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    footprint = 1.0
    if config.affine_p > 0:
        theta = math.radians(min(abs(config.rotate), 45.0))
        scale = max(1.0, *config.scale)
        rotated = scale * (abs(math.cos(theta)) + abs(math.sin(theta)))
        footprint = rotated + 2.0 * abs(config.translate)
    size = out_size * footprint + 2.0 * _elastic_margin(config)
    extra = max(0, int(math.ceil(size)) - out_size)
    return out_size + extra + (extra % 2)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move random draws to the working device. Non-blocking only host -> CUDA (safe with
    pageable memory); CUDA -> CPU stays blocking, as a non-blocking copy could be read early."""
    if x.device == device:
        return x
    return x.to(device, non_blocking=device.type == "cuda")


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _draw(
    batch: int, size: int, config: AugmentConfig, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 16) float32 uniforms and, if elastic is enabled, (B, 2, L, L) float32 U[-1, 1]
    noise with L = size + 2 * radius; drawn on the generator's device, returned on `device`."""
    gdev = generator.device
    u = torch.rand(batch, _N_UNIFORM, generator=generator, device=gdev, dtype=torch.float32)
    noise = None
    if config.elastic_p > 0:
        side = size + 2 * _elastic_radius(config)
        noise = torch.rand(batch, 2, side, side, generator=generator, device=gdev, dtype=torch.float32)
        noise = _to(noise, device).mul_(2.0).sub_(1.0)
    return _to(u, device), noise


def _geometry(u: torch.Tensor, config: AugmentConfig, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 16) uniforms -> (B, 2, 2) float32 matrices M = A @ D (acting on (x, y) column
    vectors) and (B, 2) float32 translations t in pixels."""
    b = u.shape[0]
    m = torch.eye(2, dtype=torch.float32, device=u.device).expand(b, 2, 2)
    t = torch.zeros(b, 2, dtype=torch.float32, device=u.device)
    if config.flips:
        k = torch.floor(u[:, _ROT90] * 4.0).clamp_(max=3.0)  # quarter turns, 0..3
        cos = torch.round(torch.cos(k * (math.pi / 2)))  # exactly 1, 0, -1, 0
        sin = torch.round(torch.sin(k * (math.pi / 2)))
        f = torch.where(u[:, _FLIP] < 0.5, -1.0, 1.0)  # mirror x or not
        # D = R90^k @ diag(f, 1)
        m = torch.stack([torch.stack([cos * f, -sin], -1), torch.stack([sin * f, cos], -1)], -2)
    if config.affine_p > 0:
        gate = u[:, _AFFINE_GATE] < config.affine_p
        zero = torch.zeros_like(u[:, 0])
        angle = torch.where(gate, _uniform(u[:, _ANGLE], -config.rotate, config.rotate), zero)
        angle = torch.deg2rad(angle)
        lo, hi = math.log(config.scale[0]), math.log(config.scale[1])
        scale = torch.exp(torch.where(gate, _uniform(u[:, _SCALE], lo, hi), zero))
        shear = torch.where(gate, _uniform(u[:, _SHEAR], -config.shear, config.shear), zero)
        shear = torch.tan(torch.deg2rad(shear))
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        # A = scale * R(angle) @ [[1, shear], [0, 1]]
        row0 = torch.stack([cos, cos * shear - sin], -1)
        row1 = torch.stack([sin, sin * shear + cos], -1)
        a = torch.stack([row0, row1], -2)
        a = torch.where(gate[:, None, None], a, torch.eye(2, dtype=a.dtype, device=a.device))
        m = a @ m
        span = config.translate * out_size
        tx = _uniform(u[:, _TX], -span, span)
        ty = _uniform(u[:, _TY], -span, span)
        t = torch.where(gate[:, None], torch.stack([tx, ty], -1), t)
    return m, t


def _elastic(u: torch.Tensor, noise: torch.Tensor, config: AugmentConfig, out_size: int) -> torch.Tensor:
    """(B, 2, L, L) U[-1, 1] noise -> (B, 2, out, out) float32 displacement (x, y) in pixels:
    separable Gaussian smoothing ('valid', so no border effect) scaled by alpha (0 where the
    sample is not deformed)."""
    b = u.shape[0]
    r = _elastic_radius(config)
    sigma = _uniform(u[:, _SIGMA], *config.elastic_sigma).clamp_(min=1e-3)
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=u.device)
    kernel = torch.exp(-(x[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(2, 0)  # (2B, K)
    side = noise.shape[-1]
    field = noise.reshape(1, 2 * b, side, side)
    field = F.conv2d(field, kernel[:, None, :, None], groups=2 * b)  # along y
    field = F.conv2d(field, kernel[:, None, None, :], groups=2 * b)  # along x
    alpha = _uniform(u[:, _ALPHA], *config.elastic_alpha)
    alpha = torch.where(u[:, _ELASTIC_GATE] < config.elastic_p, alpha, torch.zeros_like(alpha))
    return field.reshape(b, 2, out_size, out_size) * alpha[:, None, None, None]


def _sample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """x (B, C, Hin, Win) any dtype, grid (B, out, out, 2) float32 in [-1, 1] (x, y) ->
    (B, C, out, out) in x's dtype; sampled in float32 (float64 if x is)."""
    work = torch.promote_types(x.dtype, torch.float32)
    y = F.grid_sample(x.to(work), grid.to(work), mode=mode, padding_mode="reflection", align_corners=False)
    return y.to(x.dtype)


def _blur(image: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, H, W) image blurred per sample by a Gaussian of ``sigma`` (B,) pixels (separable,
    truncated at ``radius``, normalised to sum 1, reflected at the borders)."""
    b, c, h, w = image.shape
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-(x[None, :] ** 2) / (2.0 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0).to(image.dtype)  # (B*C, K)
    flat = image.reshape(1, b * c, h, w)
    pad = min(radius, h - 1, w - 1)
    if pad < radius:  # a crop smaller than the kernel: reflect what there is, then zeros
        flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
        flat = F.pad(flat, (radius - pad,) * 4)
    else:
        flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    return flat.reshape(b, c, h, w)


def _session(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Blur and gamma on the (B, C, out, out) image: focus, dose and detector response that
    differ between sessions. Draws (B, 4) uniforms only when either is enabled."""
    if config.blur_p <= 0 and config.gamma_p <= 0:
        return image
    u = _to(torch.rand(image.shape[0], 4, generator=generator, device=generator.device), image.device)
    shape = (-1, 1, 1, 1)
    if config.blur_p > 0:
        sigma = _uniform(u[:, 1], *config.blur_sigma)
        blurred = _blur(image, sigma, int(math.ceil(_TRUNCATE * max(config.blur_sigma))))
        image = torch.where((u[:, 0] < config.blur_p).view(shape), blurred, image)
    if config.gamma_p > 0:
        lo = image.amin(dim=(1, 2, 3), keepdim=True)
        span = (image.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)
        exponent = torch.exp(_uniform(u[:, 3], math.log(config.gamma[0]), math.log(config.gamma[1])))
        changed = ((image - lo) / span).clamp(0, 1) ** exponent.view(shape).to(image.dtype) * span + lo
        image = torch.where((u[:, 2] < config.gamma_p).view(shape), changed, image)
    return image


def _intensity(image: torch.Tensor, u: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Blur, gamma, brightness/contrast jitter and Gaussian noise on the (B, C, out, out) image."""
    image = _session(image, config, generator)
    if config.intensity_p > 0:
        gate = (u[:, _INTENSITY_GATE] < config.intensity_p)[:, None, None, None]
        contrast = _uniform(u[:, _CONTRAST], *config.contrast)[:, None, None, None].to(image.dtype)
        offset = _uniform(u[:, _BRIGHTNESS], -config.brightness, config.brightness)
        offset = offset[:, None, None, None].to(image.dtype)
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        image = torch.where(gate, (image - mean) * contrast + mean + offset, image)
    if config.noise_p > 0:
        gate = (u[:, _NOISE_GATE] < config.noise_p)[:, None, None, None]
        std = _uniform(u[:, _NOISE_STD], *config.noise_std)[:, None, None, None].to(image.dtype)
        noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=image.dtype)
        noise = _to(noise, image.device)
        image = torch.where(gate, image + noise * std, image)
    return image


def _check(image: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None, out_size: int) -> None:
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point, got {image.dtype}")
    b, _, h, w = image.shape
    for name, t in (("label", label), ("weight", weight)):
        if t is None:
            continue
        if t.ndim != 4 or t.shape[0] != b or t.shape[2:] != image.shape[2:]:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match image {tuple(image.shape)}")
        if t.device != image.device:
            raise ValueError(f"{name} is on {t.device}, image on {image.device}")
    if weight is not None and not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if not 1 <= out_size <= min(h, w):
        raise ValueError(f"out_size {out_size} must be in [1, min(H, W) = {min(h, w)}]")


def augment_batch(
    image: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor | None,
    out_size: int,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment a batch jointly and cut the transformed centre ``out_size`` square.

    image (B, C, Hin, Win) float32 (normalised; C is normally 1), label (B, Cl, Hin, Win)
    {0, 1} (float32 normally; any dtype is accepted and kept), weight (B, Cw, Hin, Win)
    float32 or None, all on one device, with ``Hin, Win >= out_size`` (ideally
    :func:`context_size`). Returns image, label, weight at (B, C*, out_size, out_size) with the
    input dtypes and device: labels stay in {0, 1} (nearest sampling), weights stay within each
    sample's input [min, max]. ``generator`` is a ``torch.Generator`` on the tensors' device
    (recommended on CUDA) or on the CPU; it is the only source of randomness, so the same
    generator state gives the same output.
    """
    _check(image, label, weight, out_size)
    b, _, h, w = image.shape
    device = image.device
    y0, x0 = (h - out_size) // 2, (w - out_size) // 2
    u, noise = _draw(b, out_size, config, generator, device)

    if not config.flips and config.affine_p <= 0 and config.elastic_p <= 0:
        crop = (slice(None), slice(None), slice(y0, y0 + out_size), slice(x0, x0 + out_size))
        image_out = image[crop].clone()
        label_out = label[crop].clone()
        weight_out = None if weight is None else weight[crop].clone()
        return _intensity(image_out, u, config, generator), label_out, weight_out

    m, t = _geometry(u, config, out_size)
    coords = torch.arange(out_size, dtype=torch.float32, device=device) - (out_size - 1) / 2.0
    px, py = coords[None, None, :], coords[None, :, None]  # output pixel offsets (x, y)
    qx = m[:, 0, 0, None, None] * px + m[:, 0, 1, None, None] * py
    qy = m[:, 1, 0, None, None] * px + m[:, 1, 1, None, None] * py
    qx = qx + (t[:, 0, None, None] + (x0 + (out_size - 1) / 2.0))
    qy = qy + (t[:, 1, None, None] + (y0 + (out_size - 1) / 2.0))
    if noise is not None:
        disp = _elastic(u, noise, config, out_size)
        qx = qx + disp[:, 0]
        qy = qy + disp[:, 1]
    # Pixel centres -> [-1, 1] (align_corners=False convention).
    grid = torch.stack([(2.0 * qx + 1.0) / w - 1.0, (2.0 * qy + 1.0) / h - 1.0], dim=-1)

    image_out = _sample(image, grid, "bilinear")
    label_out = _sample(label, grid, "nearest")
    weight_out = None
    if weight is not None:
        lo = weight.amin(dim=(1, 2, 3), keepdim=True)
        hi = weight.amax(dim=(1, 2, 3), keepdim=True)
        weight_out = torch.minimum(torch.maximum(_sample(weight, grid, "bilinear"), lo), hi)
    return _intensity(image_out, u, config, generator), label_out, weight_out


__all__ = ["augment_batch", "context_size", "identity_config"]
