from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from seesr.data.degradation import (
    KERNEL_TYPES,
    DegradationConfig,
    add_noise,
    degrade,
    filter2d,
    gaussian_kernels,
    resize,
    sample_blur_kernels,
    sinc_kernels,
    usm_sharpen,
)
from seesr.data.jpeg import jpeg_compress, jpeg_tables

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "degradation" / "realesrgan.yaml"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _natural(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth colourful images with a little texture (JPEG and USM behave on them as on photos)."""
    g = _gen(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = torch.rand(batch, 3, 1, 1, generator=g) * 6
    freq = 0.1 + torch.rand(batch, 3, 1, 1, generator=g) * 0.3
    base = 0.5 + 0.35 * torch.sin(xx * freq + phase) * torch.cos(yy * freq * 0.7 + phase)
    return (base + 0.03 * torch.randn(batch, 3, size, size, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------- degrade()


def test_same_generator_same_output_and_different_generators_differ():
    gt = _natural(3, 32)
    cfg = DegradationConfig()
    a, b = degrade(gt, cfg, _gen(1)), degrade(gt, cfg, _gen(1))
    c = degrade(gt, cfg, _gen(2))
    assert torch.equal(a.lq, b.lq) and torch.equal(a.gt, b.gt)
    assert not torch.equal(a.lq, c.lq)


@pytest.mark.parametrize("scale", [4, 2])
def test_output_sizes_ranges_and_dtype(scale: int):
    gt = _natural(2, 32)
    out = degrade(gt, DegradationConfig(scale=scale), _gen())
    assert out.gt.shape == gt.shape
    assert out.lq.shape == (2, 3, 32 // scale, 32 // scale)
    for t in (out.gt, out.lq):
        assert t.dtype == gt.dtype and t.min() >= 0 and t.max() <= 1
    assert torch.allclose(out.lq * 255, (out.lq * 255).round(), atol=1e-4)  # quantize_lq


def test_osediff_options_and_half_precision():
    gt = _natural(2, 32).to(torch.bfloat16)
    cfg = DegradationConfig(usm_sharpen_gt=False, resize_lq_to_gt=True, per_sample_resize=True)
    out = degrade(gt, cfg, _gen())
    assert out.lq.shape == gt.shape and out.lq.dtype == torch.bfloat16
    assert torch.equal(out.gt, gt)  # no USM: the target is the input


def test_samples_get_their_own_parameters():
    gt = _natural(1, 32).expand(4, -1, -1, -1).contiguous()
    lq = degrade(gt, DegradationConfig(), _gen(3)).lq
    assert not torch.equal(lq[0], lq[1])


def test_degrade_rejects_bad_inputs():
    cfg = DegradationConfig()
    with pytest.raises(ValueError, match="divisible by scale=4"):
        degrade(torch.rand(1, 3, 30, 32), cfg, _gen())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 32, 32), cfg, _gen())
    with pytest.raises(TypeError, match="generator"):
        degrade(torch.rand(1, 3, 32, 32), cfg, 0)


# -------------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_each_kernel_type_is_normalised_with_the_drawn_size(kind: str):
    k = sample_blur_kernels(_gen(), 16, (kind,), (1.0,), (7, 13), (0.5, 3.0), (0.5, 4.0), (1.0, 2.0), 0.0)
    assert k.shape == (16, 21, 21)
    torch.testing.assert_close(k.sum(dim=(-2, -1)), torch.ones(16, dtype=k.dtype))
    assert k.min() >= 0
    support = (k.abs().sum(0) > 0).nonzero()
    assert support.min() >= (21 - 13) // 2 and support.max() <= 20 - (21 - 13) // 2  # side <= 13, centred
    if kind.endswith("_iso"):
        torch.testing.assert_close(k, k.transpose(-1, -2))
        torch.testing.assert_close(k, k.flip(-1))


def test_anisotropic_gaussian_follows_its_covariance():
    sx, sy, theta = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0])
    k = gaussian_kernels(sx.double(), sy.double(), theta.double(), torch.ones(1).double(), torch.tensor([False]))
    ax = torch.arange(21, dtype=torch.float64) - 10
    var_x = (k[0].sum(0) * ax**2).sum()
    var_y = (k[0].sum(1) * ax**2).sum()
    assert var_x == pytest.approx(9.0, rel=0.02) and var_y == pytest.approx(1.0, rel=0.02)
    rotated = gaussian_kernels(sx.double(), sy.double(), torch.tensor([math.pi / 2]).double(), torch.ones(1).double(),
                               torch.tensor([False]))  # fmt: skip
    torch.testing.assert_close(rotated[0], k[0].T)


def _iso(beta: float, plateau: bool) -> torch.Tensor:
    sigma = torch.tensor([2.0], dtype=torch.float64)
    beta_t = torch.tensor([beta], dtype=torch.float64)
    return gaussian_kernels(sigma, sigma, torch.zeros(1, dtype=torch.float64), beta_t, torch.tensor([plateau]))[0]


def test_plateau_has_heavier_tails_and_beta_sets_the_flatness():
    gauss, plateau = _iso(1.0, False), _iso(1.0, True)
    sharp, flat = _iso(0.5, False), _iso(4.0, False)
    for k in (gauss, plateau, sharp, flat):
        assert k.sum().item() == pytest.approx(1.0)
    assert plateau[10, 18] / plateau[10, 10] > 10 * gauss[10, 18] / gauss[10, 10]
    assert flat[10, 11] / flat[10, 10] > gauss[10, 11] / gauss[10, 10] > sharp[10, 11] / sharp[10, 10]


def test_sinc_kernel_properties():
    cutoff = torch.tensor([math.pi / 5, math.pi / 2, math.pi], dtype=torch.float64)
    k = sinc_kernels(cutoff, size=21)
    torch.testing.assert_close(k.sum(dim=(-2, -1)), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(k, k.transpose(-1, -2))
    torch.testing.assert_close(k, k.flip(-1))
    flat = k.flatten(1)
    assert (flat.argmax(1) == 10 * 21 + 10).all()  # peak at the centre
    assert (k[:2].min(dim=-1).values.min(dim=-1).values < 0).all()  # ringing lobes
    assert k[0, 10, 10] < k[1, 10, 10]  # lower cutoff = wider kernel = lower peak
    # the centre is cutoff^2 / (4 pi) before normalisation, and a narrow sampled kernel already sums to ~1
    torch.testing.assert_close(k[1:, 10, 10], cutoff[1:] ** 2 / (4 * math.pi), rtol=0.1, atol=0)


def test_filter2d_with_delta_and_box_kernels():
    x = torch.rand(2, 3, 16, 16, generator=_gen())
    delta = torch.zeros(2, 5, 5, dtype=torch.float64)
    delta[:, 2, 2] = 1
    torch.testing.assert_close(filter2d(x, delta), x)
    box = torch.full((2, 3, 3), 1 / 9, dtype=torch.float64)
    out = filter2d(x, box)
    torch.testing.assert_close(out[:, :, 5, 5], x[:, :, 4:7, 4:7].mean(dim=(-2, -1)))


# ------------------------------------------------------------------------------------------ noise, jpeg, usm


def test_gaussian_noise_statistics_and_gray_noise():
    x = torch.full((2, 3, 64, 64), 0.5)
    sigma = torch.tensor([10.0, 20.0], dtype=torch.float64)
    out = add_noise(x, torch.tensor([True, True]), sigma, torch.zeros(2), torch.tensor([False, True]), _gen())
    noise = out - x
    assert noise[0].std().item() * 255 == pytest.approx(10.0, rel=0.1)
    assert noise[1].std().item() * 255 == pytest.approx(20.0, rel=0.1)
    assert abs(noise.mean().item()) < 2e-3
    torch.testing.assert_close(noise[1, 0], noise[1, 2])  # grey: one plane for all channels
    assert not torch.allclose(noise[0, 0], noise[0, 2])


def test_poisson_noise_grows_with_brightness_and_scale():
    x = torch.cat([torch.full((1, 3, 64, 64), 0.1), torch.full((1, 3, 64, 64), 0.6)])
    x[:, :, :4, :] = torch.linspace(0, 1, 256).view(4, 64)  # all 256 levels present: v = 256
    scale = torch.tensor([1.0, 1.0], dtype=torch.float64)
    gauss = torch.tensor([False, False])
    out = add_noise(x, gauss, torch.zeros(2), scale, torch.tensor([False, False]), _gen())
    std = (out - x)[:, :, 8:, 8:].flatten(1).std(1)
    expected = torch.sqrt(torch.tensor([0.1, 0.6]) * 256) / 256  # std of Poisson(x v) / v
    torch.testing.assert_close(std, expected, rtol=0.1, atol=0)
    stronger = add_noise(x, gauss, torch.zeros(2), scale * 3, torch.tensor([False, False]), _gen())
    assert (stronger - x)[:, :, 8:, 8:].std() > (out - x)[:, :, 8:, 8:].std() * 2


def test_jpeg_changes_the_image_more_at_lower_quality():
    x = _natural(1, 48).expand(3, -1, -1, -1)
    out = jpeg_compress(x, torch.tensor([10.0, 50.0, 95.0]))
    err = (out - x).abs().flatten(1).mean(1)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert err[0] > err[1] > err[2] > 0.5 / 255


def test_jpeg_matches_pillow_within_one_level():
    x = _natural(1, 40)  # not a multiple of 16: padding path
    array = (x[0].permute(1, 2, 0) * 255).round().byte().numpy()
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    for quality in (30, 80):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=quality, subsampling=2)
        pil = np.asarray(Image.open(buffer)).astype(np.float64)
        ours = jpeg_compress(x, torch.tensor([float(quality)]))[0].permute(1, 2, 0).numpy() * 255
        assert np.abs(ours - pil).mean() < 1.5
        assert np.abs(ours - pil).mean() < np.abs(array - pil).mean()


def test_jpeg_tables_follow_the_quality_scale():
    luma, chroma = jpeg_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert luma[0, 0, 0] == 16 and chroma[0, 0, 0] == 17  # quality 50 = the standard tables
    assert (luma[1] == 1).all()
    assert (luma[2] >= luma[0]).all()


def test_usm_sharpen_increases_edge_contrast_and_keeps_flat_areas():
    x = torch.full((1, 3, 32, 32), 0.3)
    x[..., 16:] = 0.7
    out = usm_sharpen(x)
    assert out[..., 15].mean() < 0.3 and out[..., 16].mean() > 0.7  # overshoot on both sides of the edge
    assert out.min() >= 0 and out.max() <= 1
    flat = torch.full((1, 3, 32, 32), 0.4)
    torch.testing.assert_close(usm_sharpen(flat), flat)


def test_resize_per_sample_modes():
    x = torch.rand(3, 3, 8, 8, generator=_gen())
    out = resize(x, (4, 4), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out[0], torch.nn.functional.avg_pool2d(x[0:1], 2)[0])
    assert out.shape == (3, 3, 4, 4)


# ----------------------------------------------------------------------------------------------------- config


def test_yaml_file_equals_defaults_and_round_trips(tmp_path: Path):
    assert DegradationConfig.from_yaml(CONFIG_PATH) == DegradationConfig()
    custom = dataclasses.replace(DegradationConfig(), scale=2, jpeg_range=(50.0, 60.0), resize_lq_to_gt=True)
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"degradation": custom.to_dict()}))
    assert DegradationConfig.from_yaml(path) == custom
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump(custom.to_dict()))
    assert DegradationConfig.from_yaml(flat) == custom


def test_yaml_file_documents_every_key():
    text = CONFIG_PATH.read_text()
    lines = [line for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith("#")]
    keys = {line.split(":")[0].strip() for line in lines}
    assert keys == {f.name for f in dataclasses.fields(DegradationConfig)}
    assert all("#" in line for line in lines)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"kernel_prob": (0.5, 0.2, 0.1, 0.1, 0.05, 0.03)}, ValueError, "kernel_prob"),
        ({"resize_prob": (0.5, 0.5)}, ValueError, "resize_prob"),
        ({"blur_sigma": (3.0, 0.2)}, ValueError, "blur_sigma"),
        ({"jpeg_range": (30.0, 120.0)}, ValueError, "jpeg_range"),
        ({"kernel_size_range": (7, 22)}, ValueError, "kernel_size_range"),
        ({"kernel_list": ("iso", "box")}, ValueError, "kernel_list"),
        ({"sinc_prob": 1.5}, ValueError, "sinc_prob"),
        ({"scale": 0}, ValueError, "scale"),
        ({"scale": 4.0}, TypeError, "scale"),
        ({"quantize_lq": "yes"}, TypeError, "quantize_lq"),
    ],
)
def test_config_validation(changes: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        DegradationConfig(**changes)


def test_from_dict_rejects_unknown_keys(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown degradation config keys.*jpeg_rnage"):
        DegradationConfig.from_dict({"jpeg_rnage": [30, 95]})
    path = tmp_path / "bad.yaml"
    path.write_text("degradation:\n  sinc_prob: 2\n")
    with pytest.raises(ValueError, match="bad.yaml.*sinc_prob"):
        DegradationConfig.from_yaml(path)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_its_own_generator_and_keeps_device():
    gt = _natural(4, 64).cuda()
    cfg = DegradationConfig()
    a = degrade(gt, cfg, torch.Generator("cuda").manual_seed(0))
    b = degrade(gt, cfg, torch.Generator("cuda").manual_seed(0))
    assert a.lq.is_cuda and torch.equal(a.lq, b.lq)
    c = degrade(gt, cfg, torch.Generator().manual_seed(0))  # CPU generator: same draws as on CPU
    d = degrade(gt.cpu(), cfg, torch.Generator().manual_seed(0))
    assert (c.lq.cpu() - d.lq).abs().max() <= 2 / 255
