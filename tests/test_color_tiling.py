"""Colour fix and latent-tiling helpers."""

import pytest
import torch

from pipelines.tiling import gaussian_weights, needs_latent_tiling, tile_grid, tile_starts
from seesr.color import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition


def images(seed: int, shape=(2, 3, 32, 32)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_adain_matches_reference_statistics():
    content, reference = images(0) * 0.5, images(1) * 0.3 + 0.4
    fixed = adain_color_fix(content, reference)
    assert torch.allclose(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-4)
    assert torch.allclose(fixed.std((2, 3)), reference.std((2, 3)), atol=1e-3)


def test_wavelet_keeps_content_detail_and_reference_colour():
    content, reference = images(2), images(3)
    fixed = wavelet_color_fix(content, reference)
    high, low = wavelet_decomposition(content)
    assert torch.allclose(high + low, content, atol=1e-5)  # a perfect reconstruction
    _, ref_low = wavelet_decomposition(reference)
    assert torch.allclose(fixed, (high + ref_low).clamp(0, 1), atol=1e-6)
    assert (fixed - content).abs().mean() > 1e-3


def test_color_fix_dispatch_and_errors():
    content, reference = images(4), images(5)
    assert color_fix(content, reference, None) is content
    with pytest.raises(ValueError, match="color_fix"):
        color_fix(content, reference, "histogram")
    with pytest.raises(ValueError, match="differ"):
        color_fix(content, reference[..., :16], "adain")


@pytest.mark.parametrize(("length", "tile", "overlap"), [(96, 96, 4), (100, 96, 4), (200, 64, 32), (37, 16, 8)])
def test_tiles_cover_everything_with_fixed_size(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
        assert 0 <= s <= length - min(tile, length)
    assert covered.all() and starts[-1] == max(length - tile, 0)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tile_grid_and_area_rule():
    grid = tile_grid(40, 20, 16, 4)
    assert all(h == 16 and w == 16 for _, _, h, w in grid)
    assert (
        not needs_latent_tiling(64, 64, 96)
        and needs_latent_tiling(100, 96, 96)
        and not needs_latent_tiling(9, 9, None)
    )


def test_gaussian_weights_symmetric_peak_in_centre():
    w = gaussian_weights(7, 9)
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))
    assert w.argmax() == 3 * 9 + 4 and (w > 0).all()
