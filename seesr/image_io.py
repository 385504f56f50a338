"""Image input/output shared by every command: input expansion, robust loading, atomic writes, sharding.

Loading always yields an 8-bit RGB image plus, when the file had one, a separate 8-bit alpha channel, so that
the models see one pixel convention and the alpha can be put back on the result (resized to the output size).
Writes go to a temporary file in the destination folder and are moved into place with `os.replace`, so a
crash or a bad input never leaves a half-written file behind.
"""

from __future__ import annotations

import glob
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
ALPHA_FORMATS: frozenset[str] = frozenset({"PNG", "WEBP", "TIFF"})
_GLOB_CHARS = "*?["
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

T = TypeVar("T")


class ImageLoadError(ValueError):
    """An input file could not be read as an image; the message is one line, `path: reason`."""


@dataclass
class LoadedImage:
    """A decoded input image.

    Attributes:
        rgb: the pixels as an 8-bit `RGB` image (EXIF orientation applied).
        alpha: the transparency as an 8-bit `L` image of the same size, or None when the file had none.
        path: the file it came from.
        mode: the PIL mode of the file before conversion (e.g. `I;16`, `P`, `RGBA`).
        bit_depth: bits per channel of the file (16 for 16-bit PNG/TIFF, else 8); `rgb` is always 8-bit.
        grey: the file had no colour (modes 1, L, LA, I;16*, I, F, or a palette of greys).
        icc_profile: the embedded ICC profile, if any.
        exif: the EXIF block with the orientation reset (the pixels are already upright), if any.
    """

    rgb: Image.Image
    alpha: Image.Image | None
    path: Path
    mode: str
    bit_depth: int = 8
    grey: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _skip_reason(path: Path, folder: Path) -> str | None:
    """Why a folder scan does not take `path` (None: it is an input)."""
    if any(part.startswith(".") for part in path.relative_to(folder).parts):
        return "hidden (dotfile, or a temporary file of an interrupted write)"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image suffix ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    return None


def _scan_folder(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted); skipped files are logged, one line per reason."""
    found, skipped = [], {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        reason = _skip_reason(path, folder)
        if reason is None:
            found.append(path)
        else:
            skipped.setdefault(reason, []).append(path.relative_to(folder).as_posix())
    for reason, names in skipped.items():
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        logger.info("%s: skipped %d file(s), %s: %s", folder, len(names), reason, shown)
    return found


def expand_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (recursively, image extensions only, sorted) and glob patterns.

    Returns the files in a stable order without duplicates (first occurrence wins), and one-line error
    strings for inputs that do not exist, globs that match nothing and folders without images.
    """
    files: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = _scan_folder(path)
            if not found:
                errors.append(f"{pattern}: folder contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            for p in found:
                add(p)
        elif path.is_file():
            add(path)
        elif any(c in pattern for c in _GLOB_CHARS):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                errors.append(f"{pattern}: pattern matches no files")
            for p in found:
                add(p)
        else:
            errors.append(f"{pattern}: no such file or folder")
    return files, errors


def _sixteen_bit_to_8bit(image: Image.Image) -> Image.Image:
    # Pillow opens 16-bit grey PNG/TIFF as I;16* (or I): map [0, 65535] onto [0, 255] (x / 257, rounded).
    array = np.asarray(image).astype(np.float64)
    array = np.clip(array, 0, 65535) / 257.0
    return Image.fromarray(np.round(array).astype(np.uint8), mode="L")


def _float_to_8bit(image: Image.Image) -> Image.Image:
    # Float images (mode F, e.g. 32-bit TIFF) are taken to be in [0, 1].
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    return Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")


def _to_rgb_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA") if (mode == "PA" or "transparency" in image.info) else image.convert("RGB")
    elif mode in ("RGBa", "La"):
        image = image.convert("RGBA")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("LA" if mode == "L" else "RGBA")
    elif mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_8bit(image)
    elif mode == "F":
        image = _float_to_8bit(image)

    alpha = None
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        image = image.convert("L" if image.mode == "LA" else "RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV
    return image, alpha


def _file_bit_depth(image: Image.Image, path: Path) -> int:
    """16 for 16-bit PNG/TIFF files (Pillow reads 16-bit colour as 8-bit RGB), else 8."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return 16
    if image.format == "PNG":
        with open(path, "rb") as file:
            header = file.read(26)
        return 16 if len(header) == 26 and header[24] == 16 else 8
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return 16 if bits and max(bits) == 16 else 8
    return 8


def _is_grey(image: Image.Image) -> bool:
    if image.mode in ("1", "L", "LA", "F", *_SIXTEEN_BIT_MODES):
        return True
    if image.mode in ("P", "PA"):
        palette = image.convert("RGB")
        array = np.asarray(palette)
        return bool((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())
    return False


def _upright_exif(image: Image.Image) -> bytes | None:
    exif = image.getexif()
    if not exif:
        return None
    exif.pop(0x0112, None)  # the pixels are upright (exif_transpose applied it)
    return exif.tobytes() if exif else None


def load_image(path: str | Path, max_pixels: int | None = 64_000_000) -> LoadedImage:
    """Load an image as 8-bit RGB (+ separate alpha), applying its EXIF orientation.

    The pixel count is checked against `max_pixels` from the header, before any pixel data is decoded.
    Supported modes: 1, L, LA, P (with transparency), I;16*, I (16-bit range), F ([0, 1] range), RGB, RGBA,
    CMYK and the other modes Pillow can convert to RGB.

    Raises:
        ImageLoadError: one line `path: reason` for missing, empty, truncated, non-image or oversized files.
    """
    path = Path(path)
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    f"{path}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
                )
            image.load()
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                logger.warning("%s: %d frames (animated); only the first frame is used", path, frames)
            original_mode = image.mode
            details = {
                "bit_depth": _file_bit_depth(image, path),
                "grey": _is_grey(image),
                "icc_profile": image.info.get("icc_profile") or None,
            }
            image = ImageOps.exif_transpose(image)
            details["exif"] = _upright_exif(image)
            rgb, alpha = _to_rgb_and_alpha(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(f"{path}: is a folder, not an image file") from exc
    except UnidentifiedImageError as exc:
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else "not a recognised image file"
        raise ImageLoadError(f"{path}: {reason}") from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError and worse on corrupt data
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageLoadError(f"{path}: cannot decode image ({message})") from exc
    return LoadedImage(rgb=rgb, alpha=alpha, path=path, mode=original_mode, **details)


def _temp_path(path: Path) -> Path:
    # Same folder (so os.replace is atomic), hidden, and ending in the real suffix for writers that sniff it.
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")


def atomic_save_file(write_fn: Callable[[Path], T], path: str | Path) -> T:
    """Call `write_fn(tmp_path)` and move the result onto `path`; on any error remove the temporary file.

    The parent folder is created if needed. Returns whatever `write_fn` returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        result = write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def claim_path(path: str | Path) -> bool:
    """Claim an output name by creating it empty, exclusively and without following links; False if it exists.

    The claim is later replaced by an atomic write, or removed by the caller when the work fails.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        os.close(os.open(path, flags, 0o644))
    except FileExistsError:
        return False
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_save_file(lambda tmp: tmp.write_text(text, encoding="utf-8"), path)


def image_format_for(path: str | Path) -> str:
    """The Pillow format name for a file suffix, e.g. `.jpg` -> `JPEG`."""
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None:
        raise ValueError(
            f"path {str(path)!r} has an unsupported image suffix {suffix!r}; expected one of "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return fmt


def atomic_save_image(
    image: Image.Image, path: str | Path, alpha: Image.Image | None = None, **save_kwargs: object
) -> None:
    """Save `image` atomically, with the format taken from the suffix of `path`.

    When `alpha` is given and the format stores transparency (PNG, WebP, TIFF) it is resized to the image size
    (bicubic) and attached; for other formats it is dropped with a debug log line.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    fmt = image_format_for(path)
    if alpha is not None:
        if fmt in ALPHA_FORMATS:
            if alpha.mode != "L":
                alpha = alpha.convert("L")
            if alpha.size != image.size:
                alpha = alpha.resize(image.size, Image.Resampling.BICUBIC)
            image = image.convert("RGB")
            image.putalpha(alpha)
        else:
            logger.debug("%s: format %s has no alpha channel; transparency dropped", path, fmt)
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    kwargs = dict(save_kwargs)
    atomic_save_file(lambda tmp: image.save(tmp, format=fmt, **kwargs), path)


def shard(items: list[T], process_index: int, num_processes: int) -> list[T]:
    """Round-robin share of `items` for one process: each item goes to exactly one process."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be an int in [0, {num_processes}), got {process_index!r}")
    return list(items[process_index::num_processes])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> float32 ``(3, H, W)`` RGB tensor in ``[0, 1]`` (one uint8 copy, then one float)."""
    return unit_float(pil_to_uint8(image))


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> uint8 ``(3, H, W)`` RGB tensor: :func:`pil_to_tensor` without the float conversion (a
    quarter of its memory; :func:`unit_float` gives the same float values later, e.g. per tile)."""
    import torch

    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image too
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def unit_float(image: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An image tensor in [0, 1] as float (``dtype``, default float32): uint8 tensors are read as value / 255
    exactly as :func:`pil_to_tensor` computes it (float32 first), float ones are cast."""
    import torch

    dtype = dtype or torch.float32
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255).to(dtype)
    return image.to(dtype)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float ``(3, H, W)`` tensor in ``[0, 1]`` -> 8-bit RGB PIL image (clamped, rounded half to even)."""
    import torch

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")
