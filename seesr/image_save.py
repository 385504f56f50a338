"""Writing a model result so that it keeps what the input had: bit depth, greyscale, alpha, ICC profile, EXIF.

`save_result` takes the model output as float pixels in [0, 1] (H, W, 3) and the `LoadedImage` it came from:

- 16-bit inputs give 16-bit PNGs (colour PNGs through `write_png16`, since Pillow writes 16 bits only for grey) and
  16-bit grey TIFFs; formats without 16 bits (JPEG, WebP, BMP, colour TIFF) get 8 bits and a warning saying so.
- greyscale inputs give greyscale outputs (BT.601 luma of the result) unless `keep_grey=False`;
- alpha (upscaled separately, bicubic) is attached where the format stores it; for JPEG/BMP the image is flattened
  onto white, with a warning saying so;
- the ICC profile and EXIF (orientation reset: the pixels are upright) are carried to PNG, JPEG, WebP and TIFF.

All writes are atomic (`atomic_save_file`).
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .image_io import ALPHA_FORMATS, LoadedImage, atomic_save_file, image_format_for

logger = logging.getLogger(__name__)

METADATA_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(pixels: np.ndarray, path: str | Path, icc_profile: bytes | None = None, exif: bytes | None = None):
    """Write a 16-bit PNG from uint16 pixels (H, W) or (H, W, C), C = 1..4 (grey, grey+alpha, RGB, RGBA)."""
    if pixels.dtype != np.uint16:
        raise TypeError(f"pixels: expected uint16, got {pixels.dtype}")
    array = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width, channels = array.shape
    if channels not in _PNG_COLOUR_TYPES:
        raise ValueError(f"pixels: expected 1 to 4 channels, got {channels}")
    rows = np.ascontiguousarray(array.astype(">u2")).reshape(height, width * channels).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, _PNG_COLOUR_TYPES[channels], 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header)]
    if icc_profile:
        parts.append(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        parts.append(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    parts += [_chunk(b"IDAT", zlib.compress(raw, 6)), _chunk(b"IEND", b"")]
    Path(path).write_bytes(b"".join(parts))


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _quantise(array: np.ndarray, bits: int) -> np.ndarray:
    top = 65535 if bits == 16 else 255
    return np.round(np.clip(array, 0.0, 1.0) * top).astype(np.uint16 if bits == 16 else np.uint8)


def _alpha_float(alpha: Image.Image, size: tuple[int, int]) -> np.ndarray:
    alpha = alpha.convert("L")
    if alpha.size != size:
        alpha = alpha.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(alpha, dtype=np.float64) / 255.0


def save_result(
    pixels: np.ndarray,
    path: str | Path,
    source: LoadedImage,
    keep_grey: bool = True,
    quality: int | None = None,
) -> None:
    """Save float RGB `pixels` in [0, 1], shape (H, W, 3), as `path` keeping what `source` had (see module doc)."""
    path = Path(path)
    fmt = image_format_for(path)
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels: expected (H, W, 3), got {pixels.shape}")
    height, width = pixels.shape[:2]
    channels = [_luma(pixels)] if (keep_grey and source.grey) else [pixels[..., i] for i in range(3)]
    alpha = _alpha_float(source.alpha, (width, height)) if source.alpha is not None else None
    if alpha is not None and fmt not in ALPHA_FORMATS:
        logger.warning(
            "%s: %s has no alpha channel; the transparency of %s was flattened onto white "
            "(use --format png to keep it)",
            path,
            fmt,
            source.path,
        )
        channels = [c * alpha + (1.0 - alpha) for c in channels]
        alpha = None
    if alpha is not None:
        channels.append(alpha)
    stacked = np.stack(channels, axis=-1)
    bits = source.bit_depth
    sixteen_ok = fmt == "PNG" or (fmt == "TIFF" and stacked.shape[-1] == 1)
    if bits == 16 and not sixteen_ok:
        logger.warning("%s: 16-bit input %s written with 8 bits (%s output; PNG keeps 16)", path, source.path, fmt)
        bits = 8
    keep_meta = fmt in METADATA_FORMATS
    icc, exif = (source.icc_profile, source.exif) if keep_meta else (None, None)
    if bits == 16 and fmt == "PNG":
        data = _quantise(stacked, 16)
        atomic_save_file(lambda tmp: write_png16(data, tmp, icc, exif), path)
        return
    data = _quantise(stacked, bits)
    if bits == 16:  # grey TIFF
        image = Image.fromarray(data[..., 0], mode="I;16")
    else:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[data.shape[-1]]
        image = Image.fromarray(data[..., 0] if mode == "L" else data, mode=mode)
    kwargs: dict = {}
    if icc:
        kwargs["icc_profile"] = icc
    if exif:
        kwargs["exif"] = exif
    if quality is not None and fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = quality
    atomic_save_file(lambda tmp: image.save(tmp, format=fmt, **kwargs), path)
