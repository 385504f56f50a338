"""Tiled VAE with image-wide GroupNorm statistics (pipelines/vae_tiling.py) against the untiled VAE and diffusers'."""

import math

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from pipelines.vae_tiling import (
    GroupNormAggregator,
    core_splits,
    receptive_radius,
    tiled_decode,
    tiled_encode,
)
from tests.tiny import tiny_vae


def shallow_vae(attention: bool, seed: int = 0) -> AutoencoderKL:
    """A two-level VAE (scale factor 2): cheap enough to tile exhaustively with a full receptive-field overlap."""
    return tiny_vae(seed, levels=2, sample_size=32, attention=attention)


def smooth(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    """A smooth random field (random values at a quarter resolution, bilinearly enlarged)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(*shape[:2], *(max(s // 4, 2) for s in shape[2:]), generator=generator)
    return torch.nn.functional.interpolate(low, size=shape[2:], mode="bilinear") * scale


def diffusers_tiled(vae: AutoencoderKL, fn, sample_tile: int):
    """diffusers' own tiling (each tile normalised alone, 25 % overlap, linear blending)."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = (
        sample_tile,
        sample_tile // scale,
        0.25,
    )
    try:
        with torch.no_grad():
            return fn()
    finally:
        vae.disable_tiling()


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - b.float()).abs()
    return diff.max().item(), diff.mean().item()


def test_core_splits_partition_the_axis():
    for length, tile, overlap, align in ((100, 40, 8, 1), (96, 32, 8, 8), (37, 20, 5, 1), (30, 40, 8, 1)):
        splits = core_splits(length, tile, overlap, align)
        assert splits[0][0] == 0 and splits[-1][1] == length
        for (a, b, wa, wb), nxt in zip(splits, splits[1:] + [None], strict=True):
            assert wb - wa == min(tile, length) and wa <= max(a - overlap, 0) and wb >= min(b + overlap, length)
            assert a % align == 0 and b % align == 0 and (nxt is None or nxt[0] == b)


def test_decode_matches_untiled_without_attention():
    """Full-radius overlap, no attention: equal to the untiled decoder up to float rounding; diffusers' is not."""
    vae = shallow_vae(attention=False)
    latents = smooth((1, 4, 40, 38), seed=1, scale=3)
    overlap = math.ceil(receptive_radius(vae.decoder))
    with torch.no_grad():
        reference = vae.decode(latents).sample
    ours = tiled_decode(vae, latents, tile_size=2 * overlap + 10, overlap=overlap)
    theirs = diffusers_tiled(vae, lambda: vae.decode(latents).sample, sample_tile=40)
    ours_max, ours_mean = errors(ours, reference)
    theirs_max, theirs_mean = errors(theirs, reference)
    assert ours.shape == reference.shape == (1, 3, 80, 76)
    assert ours_max < 1e-4, (ours_max, theirs_max)
    assert theirs_mean > 1e-2 and ours_max < theirs_max / 1000, (ours_max, ours_mean, theirs_max, theirs_mean)


def test_encode_matches_untiled_without_attention():
    vae = shallow_vae(attention=False)
    image = smooth((1, 3, 64, 64), seed=2).tanh()
    overlap = math.ceil(receptive_radius(vae.encoder) / 2) * 2
    with torch.no_grad():
        reference = vae.encode(image).latent_dist
    ours = tiled_encode(vae, image, tile_size=2 * overlap + 24, overlap=overlap)
    theirs = diffusers_tiled(vae, lambda: vae.encode(image).latent_dist, sample_tile=32)
    assert ours.mean.shape == reference.mean.shape == (1, 4, 32, 32)
    assert errors(ours.mean, reference.mean)[0] < 1e-4 and errors(ours.std, reference.std)[0] < 1e-4
    assert errors(theirs.mean, reference.mean)[1] > 1e-2
    # The posterior samples with a generator exactly as the untiled one does.
    sample = ours.sample(generator=torch.Generator().manual_seed(5))
    expected = reference.sample(generator=torch.Generator().manual_seed(5))
    assert errors(sample, expected)[0] < 1e-4


def test_attention_far_closer_than_per_tile_normalisation():
    """With the mid-block attention (per window here, global untiled) the error stays a small fraction of that of
    diffusers' tiling, which normalises each tile alone. Also measures fast mode (downsampled-image statistics)."""
    vae = shallow_vae(attention=True, seed=1)
    latents = smooth((1, 4, 40, 38), seed=3, scale=3)
    overlap = math.ceil(receptive_radius(vae.decoder))
    with torch.no_grad():
        reference = vae.decode(latents).sample
    ours = tiled_decode(vae, latents, tile_size=2 * overlap + 10, overlap=overlap)
    fast = tiled_decode(vae, latents, tile_size=2 * overlap + 10, overlap=overlap, exact=False)
    theirs = diffusers_tiled(vae, lambda: vae.decode(latents).sample, sample_tile=40)
    (ours_max, ours_mean), (fast_max, fast_mean), (theirs_max, theirs_mean) = (
        errors(x, reference) for x in (ours, fast, theirs)
    )
    measured = f"decode max/mean: exact {ours_max:.4f}/{ours_mean:.5f}, fast {fast_max:.4f}/{fast_mean:.5f}, "
    measured += f"diffusers {theirs_max:.4f}/{theirs_mean:.5f}"
    assert ours_mean < theirs_mean / 10 and ours_max < theirs_max / 4, measured
    assert fast_mean < theirs_mean, measured
    image = smooth((1, 3, 64, 64), seed=4).tanh()
    overlap = math.ceil(receptive_radius(vae.encoder) / 2) * 2
    with torch.no_grad():
        reference = vae.encode(image).latent_dist.mean
    ours = tiled_encode(vae, image, tile_size=2 * overlap + 24, overlap=overlap).mean
    theirs = diffusers_tiled(vae, lambda: vae.encode(image).latent_dist.mean, sample_tile=32)
    (ours_max, ours_mean), (theirs_max, theirs_mean) = errors(ours, reference), errors(theirs, reference)
    measured = f"encode max/mean: exact {ours_max:.4f}/{ours_mean:.5f}, diffusers {theirs_max:.4f}/{theirs_mean:.5f}"
    assert ours_mean < theirs_mean / 10 and ours_max < theirs_max / 4, measured


def test_independent_of_tile_size():
    vae = shallow_vae(attention=True)
    latents = smooth((1, 4, 40, 30), seed=6, scale=3)
    overlap = math.ceil(receptive_radius(vae.decoder))
    small, large = (
        tiled_decode(vae, latents, tile_size=t, overlap=overlap) for t in (2 * overlap + 8, 2 * overlap + 12)
    )
    with torch.no_grad():
        reference = vae.decode(latents).sample
    # Attention sees different windows, so they differ a little: far less than either differs from the untiled one.
    assert errors(small, large)[1] < 0.05 * reference.abs().mean().item()


def test_dtype_and_odd_sizes_preserved():
    """float16 in, float16 out, close to the same tiling in float32; sides that are no multiple of the tile."""
    vae = shallow_vae(attention=True)
    latents = smooth((2, 4, 12, 10), seed=7, scale=3)  # batch of two
    image = smooth((2, 3, 24, 20), seed=8).tanh()
    full = tiled_decode(vae, latents, tile_size=10, overlap=2), tiled_encode(vae, image, tile_size=20, overlap=4).mean
    vae.to(torch.float16)
    half = tiled_decode(vae, latents, tile_size=10, overlap=2), tiled_encode(vae, image, tile_size=20, overlap=4).mean
    assert half[0].dtype == half[1].dtype == torch.float16
    assert half[0].shape == full[0].shape == (2, 3, 24, 20) and half[1].shape == full[1].shape == (2, 4, 12, 10)
    for h, f in zip(half, full, strict=True):
        assert errors(h, f)[1] < 0.02 * f.abs().mean().item()


def test_small_inputs_run_the_stock_forward_bitwise():
    vae = tiny_vae()
    latents = smooth((1, 4, 8, 8), seed=9)
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae, latents, tile_size=8), vae.decode(latents).sample)
        image = smooth((1, 3, 64, 64), seed=10).tanh()
        assert torch.equal(tiled_encode(vae, image, tile_size=64).mean, vae.encode(image).latent_dist.mean)


def test_layers_restored_and_bad_input():
    vae = shallow_vae(attention=True)
    tiled_decode(vae, smooth((1, 4, 16, 16), seed=11), tile_size=12, overlap=2)
    norms = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all("forward" not in vars(m) for m in norms)
    assert all(not m._forward_pre_hooks for m in vae.modules())
    with pytest.raises(ValueError, match="tiled_decode: tile size 8 leaves no core"):
        tiled_decode(vae, smooth((1, 4, 16, 16), seed=11), tile_size=8, overlap=4)
    with pytest.raises(ValueError, match="tiled_encode: image sides"):
        tiled_encode(vae, torch.zeros(1, 3, 41, 40), tile_size=16)
    with pytest.raises(ValueError, match=r"tiled_decode: latents: expected a \(B, 4, H, W\)"):
        tiled_decode(vae, torch.zeros(1, 3, 20, 20), tile_size=8)
    with pytest.raises(RuntimeError, match="boom"), GroupNormAggregator(vae.decoder):
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in norms)


def test_lean_resnets_are_bitwise_the_stock_blocks():
    """pipelines.common.lean_vae_resnets (in-place SiLU / residual add, no division by 1) changes no bit: untiled and
    tiled (odd window strides), contiguous and channels-last inputs, float32 and bfloat16; blocks restored after."""
    from pipelines.common import lean_vae_resnets

    vae = tiny_vae(0)
    latents = smooth((1, 4, 20, 18), seed=12)
    image = smooth((1, 3, 72, 64), seed=13).tanh().contiguous(memory_format=torch.channels_last)
    calls = {
        "decode": lambda: vae.decode(latents.to(vae.dtype)).sample,
        "encode": lambda: vae.encode(image.to(vae.dtype)).latent_dist.mean,
        "tiled decode": lambda: tiled_decode(vae, latents, tile_size=8),
        "tiled encode": lambda: tiled_encode(vae, image, tile_size=32).mean,
    }
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            vae.to(dtype)
            for name, call in calls.items():
                stock = call()
                lean = lean_vae_resnets(vae)
                assert len(lean.blocks) == 16  # all: 2 per level in the decoder, 1 in the encoder, 2 + 2 mid-block
                with lean:
                    assert all("forward" in vars(block) for block in lean.blocks)
                    assert torch.equal(call(), stock), (name, dtype)
                assert all("forward" not in vars(block) for block in lean.blocks)
