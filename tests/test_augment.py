"""Tests of emseg.training.augment: joint batched augmentation of image, label and weight map."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from emseg.config import AugmentConfig
from emseg.training.augment import augment_batch, context_size, identity_config

OUT = 64


def _cfg(**changes: object) -> AugmentConfig:
    """The identity config with some fields changed."""
    return dataclasses.replace(identity_config(), **changes)


def _geometry_only(config: AugmentConfig | None = None) -> AugmentConfig:
    """`config` (default: the defaults) without the image-only intensity changes."""
    return dataclasses.replace(config or AugmentConfig(), intensity_p=0.0, noise_p=0.0, gamma_p=0.0, blur_p=0.0)


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _blobs(batch: int, size: int, seed: int, smooth: float = 4.0) -> np.ndarray:
    """(B, 1, size, size) float32 {0, 1} cell-like labels."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.standard_normal((batch, 1, size, size)), (0, 0, smooth, smooth))
    return (noise > 0).astype(np.float32)


def _centre(x: torch.Tensor, out: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    y0, x0 = (h - out) // 2, (w - out) // 2
    return x[..., y0 : y0 + out, x0 : x0 + out]


def _ramps(batch: int, size: int) -> torch.Tensor:
    """(B, 2, size, size) float32: channel 0 = x (column) coordinate, channel 1 = y (row)."""
    c = torch.arange(size, dtype=torch.float32)
    x = c[None, :].expand(size, size)
    y = c[:, None].expand(size, size)
    return torch.stack([x, y])[None].repeat(batch, 1, 1, 1)


def _batch(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    image = torch.randn(batch, 1, size, size, generator=g)
    label = torch.from_numpy(_blobs(batch, size, seed))
    weight = 0.5 + 3.0 * torch.rand(batch, 1, size, size, generator=g)
    return image, label, weight


def test_context_size() -> None:
    assert context_size(256, AugmentConfig()) == 508
    assert context_size(OUT, identity_config()) == OUT
    for out in (1, 63, 64, 100, 255):
        for cfg in (AugmentConfig(), _cfg(flips=True), _cfg(affine_p=0.5), _cfg(elastic_p=0.5)):
            c = context_size(out, cfg)
            assert c >= out and (c - out) % 2 == 0
    assert context_size(100, AugmentConfig()) > context_size(100, _cfg(affine_p=1.0))
    with pytest.raises(ValueError):
        context_size(0, AugmentConfig())


@pytest.mark.parametrize("size", [OUT, OUT + 20, OUT + 21])
def test_identity_config_returns_centre_crop_exactly(size: int) -> None:
    image, label, weight = _batch(3, size, seed=0)
    out = augment_batch(image, label, weight, OUT, identity_config(), _gen(1))
    for got, src in zip(out, (image, label, weight), strict=True):
        assert torch.equal(got, _centre(src, OUT))
        assert got.data_ptr() != src.data_ptr()  # a copy, not a view of the input
    assert augment_batch(image, label, None, OUT, identity_config(), _gen(1))[2] is None


@pytest.mark.parametrize(
    "config",
    [
        _cfg(elastic_p=1.0, elastic_alpha=(0.0, 0.0)),  # elastic alone with alpha = 0
        _cfg(affine_p=1.0, rotate=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0),
    ],
    ids=["elastic-alpha0", "affine-degenerate"],
)
def test_resampling_with_identity_transform_is_identity(config: AugmentConfig) -> None:
    size = context_size(OUT, config) + 10
    image, label, weight = _batch(4, size, seed=2)
    img, lab, wgt = augment_batch(image, label, weight, OUT, config, _gen(3))
    torch.testing.assert_close(img, _centre(image, OUT), rtol=0, atol=1e-4)
    torch.testing.assert_close(wgt, _centre(weight, OUT), rtol=0, atol=1e-4)
    assert torch.equal(lab, _centre(label, OUT))


def test_dihedral_flips_are_exact() -> None:
    b = 96
    image, label, _ = _batch(b, OUT, seed=4)
    img, lab, _ = augment_batch(image, label, None, OUT, _cfg(flips=True), _gen(5))
    seen = set()
    for i in range(b):
        matches = []
        for k in range(4):
            for flip in (False, True):
                src_img, src_lab = image[i], label[i]
                if flip:
                    src_img, src_lab = src_img.flip(-1), src_lab.flip(-1)
                src_img = torch.rot90(src_img, k, dims=(-2, -1))
                src_lab = torch.rot90(src_lab, k, dims=(-2, -1))
                if torch.equal(lab[i], src_lab) and torch.allclose(img[i], src_img, atol=1e-4):
                    matches.append((k, flip))
        assert matches, f"sample {i} is not a dihedral transform of its input"
        seen.update(matches)
    assert len(seen) == 8  # all eight rotations/flips occur


def test_image_equal_to_label_stays_equal() -> None:
    config = _geometry_only()
    size = context_size(OUT, config)
    label = torch.from_numpy(_blobs(8, size, seed=6))
    # Distance of every input pixel to the nearest pixel of the other class, carried along as
    # the "weight map" so it goes through the very same sampling grid.
    lab_np = label.numpy().astype(bool)
    dist = np.stack(
        [np.where(m[0], ndi.distance_transform_edt(m[0]), ndi.distance_transform_edt(~m[0]))[None] for m in lab_np]
    ).astype(np.float32)
    dist_t = torch.from_numpy(dist)
    img, lab, dst = augment_batch(label.clone(), label, dist_t, OUT, config, _gen(7))
    thresholded = (img >= 0.5).float()
    assert (thresholded == lab).float().mean().item() >= 0.98
    # Away from class edges they agree exactly: where the interpolated distance is >= 3 px,
    # one of the four bilinear neighbours is >= 3 px from the other class and the others lie
    # within sqrt(2) px of it, so all four (and the nearest one) share one class.
    inner = dst >= 3.0
    assert inner.float().mean().item() > 0.3
    assert torch.equal(thresholded[inner], lab[inner])
    # And the image really moved: it is not the plain centre crop.
    assert (lab != _centre(label, OUT)).float().mean().item() > 0.05


def test_labels_stay_binary_and_weights_in_range() -> None:
    image, label, weight = _batch(8, context_size(OUT, AugmentConfig()), seed=8)
    weight = weight + torch.arange(8, dtype=torch.float32)[:, None, None, None]  # per-sample ranges
    for seed in range(3):
        img, lab, wgt = augment_batch(image, label, weight, OUT, AugmentConfig(), _gen(seed))
        assert set(torch.unique(lab).tolist()) <= {0.0, 1.0}
        assert wgt is not None
        lo = weight.amin(dim=(1, 2, 3), keepdim=True)
        hi = weight.amax(dim=(1, 2, 3), keepdim=True)
        assert torch.all(wgt >= lo) and torch.all(wgt <= hi)
        assert torch.isfinite(img).all()
    # Integer labels keep their dtype and values.
    lab8 = augment_batch(image, label.to(torch.uint8), None, OUT, AugmentConfig(), _gen(0))[1]
    assert lab8.dtype == torch.uint8 and set(torch.unique(lab8).tolist()) <= {0, 1}


def test_same_seed_same_output_different_seed_different() -> None:
    image, label, weight = _batch(4, context_size(OUT, AugmentConfig()), seed=9)
    a = augment_batch(image, label, weight, OUT, AugmentConfig(), _gen(10))
    b = augment_batch(image, label, weight, OUT, AugmentConfig(), _gen(10))
    c = augment_batch(image, label, weight, OUT, AugmentConfig(), _gen(11))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[2], c[2])
    # The generator advances: two consecutive calls differ.
    g = _gen(10)
    first = augment_batch(image, label, weight, OUT, AugmentConfig(), g)[0]
    second = augment_batch(image, label, weight, OUT, AugmentConfig(), g)[0]
    assert torch.equal(first, a[0]) and not torch.equal(first, second)


def test_shapes_dtypes_device_preserved() -> None:
    image, label, weight = _batch(3, 150, seed=12)
    image = torch.cat([image, image * 2], dim=1)  # C = 2 works too
    img, lab, wgt = augment_batch(image, label, weight, 70, AugmentConfig(), _gen(13))
    assert img.shape == (3, 2, 70, 70) and lab.shape == (3, 1, 70, 70) and wgt is not None
    assert wgt.shape == (3, 1, 70, 70)
    assert img.dtype == lab.dtype == wgt.dtype == torch.float32
    assert img.device == lab.device == wgt.device == image.device
    with pytest.raises(ValueError):
        augment_batch(image, label, weight, 151, AugmentConfig(), _gen(0))  # larger than input
    with pytest.raises(ValueError):
        augment_batch(image, label[:2], weight, 70, AugmentConfig(), _gen(0))  # batch mismatch


def test_affine_is_an_affine_map_within_ranges() -> None:
    config = _cfg(affine_p=1.0, rotate=30.0, scale=(0.8, 1.25), shear=0.0, translate=0.1)
    size = context_size(OUT, config)
    b = 16
    ramps = _ramps(b, size)
    out = augment_batch(ramps, torch.zeros(b, 1, size, size), None, OUT, config, _gen(14))[0]
    # Fit q = M p + c by least squares per sample (bilinear sampling of a ramp is exact).
    c = torch.arange(OUT, dtype=torch.float64) - (OUT - 1) / 2
    py, px = torch.meshgrid(c, c, indexing="ij")
    ones = torch.ones(OUT * OUT, dtype=torch.float64)
    design = torch.stack([px.flatten(), py.flatten(), ones], 1)
    angles = []
    for i in range(b):
        target = out[i].reshape(2, -1).T.double()  # (N, 2) sampled (x, y)
        coef = torch.linalg.lstsq(design, target).solution  # (3, 2)
        assert (design @ coef - target).abs().max().item() < 1e-2  # an affine map
        m = coef[:2].T
        scale = math.sqrt(abs(torch.linalg.det(m).item()))
        assert 0.8 - 1e-4 <= scale <= 1.25 + 1e-4
        eye = torch.eye(2, dtype=torch.float64)
        torch.testing.assert_close(m @ m.T / scale**2, eye, atol=1e-4, rtol=0)  # a rotation
        angle = math.degrees(math.atan2(m[1, 0].item(), m[0, 0].item()))
        assert abs(angle) <= 30.0 + 1e-3
        angles.append(angle)
        shift = coef[2] - (size - 1) / 2
        assert shift.abs().max().item() <= 0.1 * OUT + 1e-3
    assert max(angles) - min(angles) > 10.0  # the angles really vary


def test_elastic_displacement_magnitude_and_smoothness() -> None:
    alpha, sigma = 200.0, 12.0
    config = _cfg(elastic_p=1.0, elastic_alpha=(alpha, alpha), elastic_sigma=(sigma, sigma))
    size = context_size(OUT, config)
    b = 8
    ramps = _ramps(b, size)
    out = augment_batch(ramps, torch.zeros(b, 1, size, size), None, OUT, config, _gen(15))[0]
    disp = (out - _centre(ramps, OUT)).double()  # (B, 2, out, out) displacement in pixels
    expected = alpha * math.sqrt(1 / 3) / (2 * math.sqrt(math.pi) * sigma)  # 2.71 px
    assert 0.7 * expected < disp.std().item() < 1.3 * expected
    assert abs(disp.mean().item()) < 0.5 * expected
    step = (disp[..., 1:] - disp[..., :-1]).std().item()  # smooth: small pixel-to-pixel change
    assert step < 0.2 * expected
    # Different samples get different fields.
    assert not torch.allclose(disp[0], disp[1], atol=0.1)


def test_intensity_changes_image_only() -> None:
    config = _cfg(intensity_p=1.0, noise_p=1.0, noise_std=(0.05, 0.1))
    image, label, weight = _batch(6, 80, seed=16)
    img, lab, wgt = augment_batch(image, label, weight, OUT, config, _gen(17))
    assert torch.equal(lab, _centre(label, OUT)) and torch.equal(wgt, _centre(weight, OUT))
    crop = _centre(image, OUT)
    assert not torch.allclose(img, crop, atol=1e-3)
    # Contrast/brightness is an affine intensity map plus noise: the residual of a per-sample
    # linear fit is the noise, with std within the configured range.
    for i in range(6):
        x, y = crop[i].flatten().double(), img[i].flatten().double()
        a = torch.stack([x, torch.ones_like(x)], 1)
        coef = torch.linalg.lstsq(a, y[:, None]).solution
        assert 0.8 - 0.02 <= coef[0].item() <= 1.25 + 0.02
        resid = (y - (a @ coef)[:, 0]).std().item()
        assert 0.04 < resid < 0.11
    # Contrast acts about the sample mean: on an image with mean ~3 the mean moves by the
    # brightness offset only (at most config.brightness, plus the noise's sample mean).
    shifted = augment_batch(image + 3.0, label, weight, OUT, config, _gen(17))[0]
    moved = (shifted.mean(dim=(1, 2, 3)) - (crop + 3.0).mean(dim=(1, 2, 3))).abs()
    assert moved.max().item() <= config.brightness + 0.01
    # Probability 0 leaves the image untouched.
    same = augment_batch(image, label, weight, OUT, _cfg(intensity_p=0.0, noise_p=0.0), _gen(17))[0]
    assert torch.equal(same, crop)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_cuda(generator_device: str) -> None:
    size = context_size(OUT, AugmentConfig())
    image, label, weight = _batch(4, size, seed=18)
    dev = [t.cuda() for t in (image, label, weight)]
    a = augment_batch(*dev, OUT, AugmentConfig(), _gen(19, generator_device))
    b = augment_batch(*dev, OUT, AugmentConfig(), _gen(19, generator_device))
    for x, y in zip(a, b, strict=True):
        assert x.device.type == "cuda" and x.shape[-2:] == (OUT, OUT)
        assert x.dtype == torch.float32
        # Same seed, same result (exact unless cuDNN picks another convolution algorithm).
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert (a[1] == b[1]).float().mean().item() > 0.999
    assert set(torch.unique(a[1]).tolist()) <= {0.0, 1.0}
    if generator_device == "cpu":
        # Same random draws as the CPU path: same result up to float rounding.
        ref = augment_batch(image, label, weight, OUT, AugmentConfig(), _gen(19))
        torch.testing.assert_close(a[0].cpu(), ref[0], atol=1e-3, rtol=0)
        assert (a[1].cpu() == ref[1]).float().mean().item() > 0.99


def test_sampling_outside_the_input_reflects() -> None:
    # No context at all (input = output size) and strong transforms: the output must still
    # consist of real (reflected) input values, never padding zeros.
    config = _cfg(flips=True, affine_p=1.0, rotate=45.0, scale=(1.25, 1.25), elastic_p=1.0)
    ones = torch.ones(4, 1, OUT, OUT)
    img, lab, wgt = augment_batch(ones, ones.clone(), 2.0 * ones, OUT, config, _gen(20))
    torch.testing.assert_close(img, ones, atol=1e-5, rtol=0)
    assert torch.equal(lab, ones)
    torch.testing.assert_close(wgt, 2.0 * ones, atol=1e-5, rtol=0)


def test_session_changes_blur_and_gamma_the_image_only():
    """Blur smooths, gamma bends intensities within each sample's range; labels and weights stay."""
    label = torch.from_numpy(_blobs(4, OUT, 0))
    image = label * 2 - 1 + 0.3 * torch.randn(label.shape, generator=_gen(1))
    weight = 1 + label
    blur = augment_batch(image, label, weight, OUT, _cfg(blur_p=1.0, blur_sigma=(1.5, 1.5)), _gen(2))
    assert torch.equal(blur[1], label) and torch.equal(blur[2], weight)
    assert float(blur[0].diff(dim=-1).abs().mean()) < 0.6 * float(image.diff(dim=-1).abs().mean())
    assert torch.allclose(blur[0].mean(), image.mean(), atol=0.02)  # normalised kernel
    gamma = augment_batch(image, label, weight, OUT, _cfg(gamma_p=1.0, gamma=(2.0, 2.0)), _gen(3))[0]
    lo, hi = image.amin(dim=(1, 2, 3)), image.amax(dim=(1, 2, 3))
    assert torch.allclose(gamma.amin(dim=(1, 2, 3)), lo) and torch.allclose(gamma.amax(dim=(1, 2, 3)), hi)
    assert bool((gamma.mean(dim=(1, 2, 3)) < image.mean(dim=(1, 2, 3))).all())  # exponent 2 darkens
    again = augment_batch(image, label, weight, OUT, _cfg(gamma_p=1.0, gamma=(2.0, 2.0)), _gen(3))[0]
    assert torch.equal(gamma, again)
