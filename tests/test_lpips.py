"""The torch-only LPIPS-VGG (seesr/models/lpips.py): the formula on random weights, the official file layouts and
strict, safe loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesr.models.lpips import LPIPS, STAGE_CHANNELS, load_lpips, save_lpips

CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision vgg16.features conv indices up to relu5_3


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(lin file in lpips' vgg.pth layout, VGG16 file in torchvision's layout incl. classifier), random values."""
    tmp_path = tmp_path_factory.mktemp("lpips")
    generator = torch.Generator().manual_seed(0)
    reference = LPIPS()
    vgg = {}
    for i in CONVS:
        weight = reference.features[i].weight
        vgg[f"features.{i}.weight"] = torch.randn(weight.shape, generator=generator) * (2 / weight[0].numel()) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(weight.shape[0], generator=generator) * 0.01
    vgg["classifier.0.weight"] = torch.zeros(4, 4)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for k, c in enumerate(STAGE_CHANNELS)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return tmp_path / "vgg.pth", tmp_path / "vgg16.pth", vgg, lin


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def independent_lpips(vgg: dict, lin: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS restated with functional calls on the raw official tensors."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    stages = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]

    def feats(z):
        z, out = (z - shift) / scale, []
        for k, convs in enumerate(stages):
            if k:
                z = F.max_pool2d(z, 2)
            for i in convs:
                z = F.relu(F.conv2d(z, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            out.append(z / (z.norm(dim=1, keepdim=True) + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        total = total + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"]).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    return total


def test_matches_an_independent_restatement_on_the_official_layouts(official, tmp_path):
    lin_path, vgg_path, vgg, lin = official
    model = load_lpips(lin_path, vgg_path)
    x, y = images(1), images(2)
    distance = model(x, y)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    torch.testing.assert_close(distance, independent_lpips(vgg, lin, x, y), rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x, x), torch.zeros(2, 1, 1, 1))
    torch.testing.assert_close(model(x, y), model(y, x))


def test_full_lpips_state_dict_and_own_layout_load_the_same(official, tmp_path):
    lin_path, vgg_path, vgg, lin = official
    reference = load_lpips(lin_path, vgg_path)
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    full = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in vgg.items()
            if k.startswith("features.")}  # fmt: skip
    full |= lin | {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    torch.save(full, tmp_path / "full.pth")
    save_lpips(reference, tmp_path / "own.safetensors")
    x, y = images(3), images(4)
    expected = reference(x, y)
    for model in (load_lpips(tmp_path / "full.pth"), load_lpips(tmp_path / "own.safetensors")):
        assert torch.equal(model(x, y), expected)


def test_gradient_reaches_the_input_only(official, tmp_path):
    lin_path, vgg_path, *_ = official
    model = load_lpips(lin_path, vgg_path)
    x = images(5).requires_grad_(True)
    model(x, images(6)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_loading_is_strict_and_safe(official, tmp_path):
    lin_path, vgg_path, vgg, lin = official
    with pytest.raises(ValueError, match=r"missing \['features.0.bias'"):
        load_lpips(lin_path)
    torch.save({**lin, "lin5.model.1.weight": torch.zeros(1, 8, 1, 1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="'lin5.weight' is not an LPIPS-VGG weight"):
        load_lpips(tmp_path / "extra.pth", vgg_path)
    torch.save({**lin, "lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"'lin0.weight' has shape \(1, 3, 1, 1\), expected \(1, 64, 1, 1\)"):
        load_lpips(tmp_path / "shape.pth", vgg_path)
    torch.save({**lin, "something": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="unexpected LPIPS/VGG key 'something'"):
        load_lpips(tmp_path / "odd.pth", vgg_path)
    with pytest.raises(ValueError, match="also in an earlier"):
        load_lpips(lin_path, lin_path, vgg_path)
    torch.save({"lin": LPIPS}, tmp_path / "pickle.pth")  # a class: refused by weights_only
    with pytest.raises(ValueError, match="not a weights_only torch file"):
        load_lpips(tmp_path / "pickle.pth")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_lpips(tmp_path / "nope.pth")
