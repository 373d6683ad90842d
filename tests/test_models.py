"""The U-Net: shapes, size divisibility, receptive field; checkpoints are safetensors only."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from emseg.config import ModelConfig
from emseg.errors import BadInputError
from emseg.models.build import build_model
from emseg.models.checkpoint import read_checkpoint, save_checkpoint
from emseg.models.halo import measure_halo
from emseg.models.unet import UNet, receptive_field


@pytest.mark.parametrize("depth,size", [(1, 34), (2, 64), (3, 72), (4, 96), (4, 160)])
def test_unet_keeps_the_input_size(depth, size):
    size = -(-size // 2**depth) * 2**depth
    model = UNet(depth=depth, base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size + 2**depth))
    assert out.shape == (2, 1, size, size + 2**depth)
    assert model.divisor == 2**depth


def test_default_unet_is_the_original_size():
    params = sum(p.numel() for p in UNet().parameters())
    assert 30e6 < params < 32e6


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_halo_bounds_the_measured_dependence(depth):
    torch.manual_seed(depth)
    model = UNet(depth=depth, base_channels=4)
    measured = measure_halo(model, model.divisor, size=256)
    assert measured <= model.halo == receptive_field(depth) // 2
    assert measured >= model.halo - 2**depth  # the bound is tight up to pooling phase


def test_halo_is_real_outside_and_inside():
    """Changing an input pixel farther than the halo leaves the centre output unchanged."""
    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4).eval()
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        base = model(x)[0, 0, 64, 64]
        far = x.clone()
        far[0, 0, 64, 64 + model.halo + 1] += 100
        near = x.clone()
        near[0, 0, 64, 64 + model.halo // 2] += 100
        assert model(far)[0, 0, 64, 64] == base
        assert model(near)[0, 0, 64, 64] != base


def test_bad_architectures_are_clear_errors():
    with pytest.raises(BadInputError, match="--arch"):
        build_model(ModelConfig(arch="resnet"))
    with pytest.raises(BadInputError, match="smp:nonexistent"):
        build_model(ModelConfig(arch="smp:nonexistent"))


def test_smp_unet_builds_offline():
    model = build_model(ModelConfig(arch="smp:resnet18"))
    assert model.divisor == 32
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 64, 96)).shape == (1, 1, 64, 96)


def test_checkpoint_roundtrip_and_pickles_are_refused(tmp_path):
    model = UNet(depth=2, base_channels=4)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"note": "hello"})
    tensors, meta = read_checkpoint(path)
    assert meta == {"note": "hello"}
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weights": Payload()}))
    with pytest.raises(BadInputError, match="never loads pickles"):
        read_checkpoint(evil)
    torch_file = tmp_path / "evil.pt"
    torch.save({"weights": np.zeros(3)}, torch_file)
    with pytest.raises(BadInputError):
        read_checkpoint(torch_file)
    assert not marker.exists()
