from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesr.image_io import (
    ImageLoadError,
    atomic_save_file,
    atomic_save_image,
    atomic_write_text,
    expand_inputs,
    load_image,
    shard,
)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _ramp(width: int = 6, height: int = 4) -> np.ndarray:
    return np.arange(width * height, dtype=np.uint8).reshape(height, width) * 10


# ---------------------------------------------------------------- modes


def test_rgb_roundtrip_exact(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(array), tmp_path / "a.png"))
    assert out.mode == "RGB" and out.rgb.mode == "RGB" and out.alpha is None
    np.testing.assert_array_equal(np.asarray(out.rgb), array)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_to_rgb(tmp_path, mode):
    image = Image.fromarray(_ramp()).convert(mode)
    out = load_image(_save(image, tmp_path / "g.png"))
    assert out.mode == mode and out.rgb.mode == "RGB" and out.alpha is None
    rgb = np.asarray(out.rgb)
    expected = np.asarray(image.convert("L"))
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_la_keeps_alpha(tmp_path):
    grey = Image.fromarray(_ramp())
    alpha = Image.fromarray(255 - _ramp())
    image = Image.merge("LA", (grey, alpha))
    out = load_image(_save(image, tmp_path / "la.png"))
    assert out.mode == "LA" and out.alpha is not None and out.alpha.mode == "L"
    np.testing.assert_array_equal(np.asarray(out.alpha), 255 - _ramp())
    np.testing.assert_array_equal(np.asarray(out.rgb)[..., 1], _ramp())


def test_rgba_keeps_alpha(tmp_path):
    array = np.zeros((4, 6, 4), dtype=np.uint8)
    array[..., 0] = 200
    array[..., 3] = _ramp()
    out = load_image(_save(Image.fromarray(array, "RGBA"), tmp_path / "a.png"))
    assert out.mode == "RGBA" and out.rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out.alpha), _ramp())
    assert np.asarray(out.rgb)[..., 0].min() == 200


def test_palette_without_and_with_transparency(tmp_path):
    image = Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = load_image(_save(image, tmp_path / "p.png"))
    assert out.mode == "P" and out.alpha is None
    assert tuple(np.asarray(out.rgb)[0, 0]) == (10, 20, 30)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 1)
    out = load_image(_save(palette, tmp_path / "pt.png", transparency=0))
    assert out.alpha is not None
    alpha = np.asarray(out.alpha)
    assert alpha[0, 0] == 255 and alpha[1, 1] == 0
    assert tuple(np.asarray(out.rgb)[0, 0]) == (0, 255, 0)


def test_sixteen_bit_scaled(tmp_path):
    values = np.array([[0, 257, 257 * 100], [65535, 65535 // 2, 128]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = load_image(_save(image, tmp_path / "s.png"))
    assert out.mode in ("I;16", "I")
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(out.rgb)[..., 0], expected)
    assert np.asarray(out.rgb).max() == 255


def test_sixteen_bit_big_endian(tmp_path):
    values = np.array([[0, 65535, 257 * 7]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    out = load_image(_save(image, tmp_path / "s.tif"))
    np.testing.assert_array_equal(np.asarray(out.rgb)[0, :, 2], [0, 255, 7])


def test_int32_mode_uses_16bit_range(tmp_path):
    values = np.array([[0, 65535, 257 * 3, 70000]], dtype=np.int32)
    out = load_image(_save(Image.fromarray(values), tmp_path / "i.tif"))
    assert out.mode == "I"
    np.testing.assert_array_equal(np.asarray(out.rgb)[0, :, 0], [0, 255, 3, 255])


def test_float_mode(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32)
    out = load_image(_save(Image.fromarray(values), tmp_path / "f.tif"))
    assert out.mode == "F"
    np.testing.assert_array_equal(np.asarray(out.rgb)[0, :, 0], [0, 128, 255, 255, 0])


def test_cmyk_to_rgb(tmp_path):
    image = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red
    out = load_image(_save(image, tmp_path / "c.tif"))
    assert out.mode == "CMYK"
    assert tuple(np.asarray(out.rgb)[0, 0]) == (255, 0, 0)


def test_exif_orientation_swaps_dimensions(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(_save(image, tmp_path / "r.jpg", exif=exif.tobytes()))
    assert out.rgb.size == (10, 20)
    assert load_image(_save(image, tmp_path / "plain.jpg")).rgb.size == (20, 10)


# ---------------------------------------------------------------- errors


def test_zero_byte(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png: empty file"):
        load_image(path)


def test_non_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.png: not a recognised image"):
        load_image(path)


def test_truncated(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _save(Image.fromarray(array), tmp_path / "t.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ") and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_over_max_pixels_checked_before_decoding(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "big.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the size check"))
    with pytest.raises(ImageLoadError, match="100x50 = 5000 pixels exceeds max_pixels=4999"):
        load_image(path, max_pixels=4999)


def test_max_pixels_none_and_limit_ok(tmp_path):
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "ok.png")
    assert load_image(path, max_pixels=5000).rgb.size == (100, 50)
    assert load_image(path, max_pixels=None).rgb.size == (100, 50)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_pil_decompression_bomb_is_load_error(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path, max_pixels=None)


# ---------------------------------------------------------------- expand_inputs


def test_expand_inputs(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    single = tmp_path / "z.png"
    single.write_bytes(b"x")
    files, errors = expand_inputs(
        [
            str(single),
            str(folder),
            str(folder / "*.png"),
            str(tmp_path / "missing.png"),
            str(tmp_path / "*.bmp"),
            str(tmp_path / "empty"),
        ]
    )
    assert files == [single, folder / "a.JPG", folder / "b.png", folder / "sub" / "c.webp"]
    assert len(errors) == 3
    assert errors[0] == f"{tmp_path / 'missing.png'}: no such file or folder"
    assert "matches no files" in errors[1] and "no images" in errors[2]
    assert all("\n" not in e for e in errors)


# ---------------------------------------------------------------- atomic writes


def test_atomic_save_image_with_alpha(tmp_path):
    image = Image.new("RGB", (8, 6), (1, 2, 3))
    alpha = Image.fromarray(np.full((3, 4), 77, np.uint8))
    atomic_save_image(image, tmp_path / "out" / "x.png", alpha=alpha)
    reloaded = load_image(tmp_path / "out" / "x.png")
    assert reloaded.alpha is not None and reloaded.alpha.size == (8, 6)
    assert np.asarray(reloaded.alpha).min() == 77 == np.asarray(reloaded.alpha).max()
    atomic_save_image(image, tmp_path / "x.jpg", alpha=alpha, quality=95)
    assert load_image(tmp_path / "x.jpg").alpha is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "x.jpg", "x.png"]


def test_atomic_save_image_failure_leaves_nothing(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_save_image(Image.new("RGB", (4, 4)), target, bogus_option=object(), optimize=object())
    with pytest.raises(ValueError, match="unsupported image suffix"):
        atomic_save_image(Image.new("RGB", (4, 4)), tmp_path / "a.xyz")

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save_file(boom, target)
    assert os.listdir(tmp_path) == ["keep.png"]
    assert target.read_bytes() == b"old"


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_text(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "second"
    assert os.listdir(tmp_path) == ["a.txt"]


# ---------------------------------------------------------------- shard


@pytest.mark.parametrize("n_items,n_procs", [(0, 1), (7, 1), (7, 3), (2, 4), (10, 5)])
def test_shard_covers_all_exactly_once(n_items, n_procs):
    items = list(range(n_items))
    parts = [shard(items, i, n_procs) for i in range(n_procs)]
    assert sorted(x for part in parts for x in part) == items
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("index,num", [(3, 3), (-1, 2), (0, 0)])
def test_shard_rejects_bad_arguments(index, num):
    with pytest.raises(ValueError, match="process_index|num_processes"):
        shard([1, 2], index, num)
