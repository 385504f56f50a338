"""Real-ESRGAN second-order degradation, written in torch: `degrade(gt, config, generator)`.

Pixels are `[0, 1]` float tensors of shape (B, 3, H, W). Every random choice comes from the `generator` argument
(drawn on the generator's device, then moved to the images' device), so a seeded generator gives the same LQ on
every run. Per-sample parameters: blur kernels, noise type/strength/greyness, JPEG qualities, the order of the
final sinc and JPEG and the final resize mode. The two intermediate resizes change the image size, so their
scale and mode are shared by the batch (as in Real-ESRGAN's training loop) unless `per_sample_resize` is set,
which runs the resizing part of the chain one sample at a time.

The chain (Wang et al., Real-ESRGAN, 2021), with `DegradationConfig` defaults = the x4plus values SeeSR uses:
  0. optional USM sharpening of the GT (the sharpened GT is both the target and the input of the chain)
  1. blur (Gaussian / generalized Gaussian / plateau, iso or aniso, or 2D sinc) -> resize -> noise -> JPEG
  2. optional blur -> resize to (H/scale * r) -> noise -> then final resize to H/scale + sinc and JPEG in random
     order
  3. optional (OSEDiff) resize of the LQ back to the GT size, then optional 8-bit quantisation
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seesr.data.jpeg import jpeg_compress

logger = logging.getLogger(__name__)

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
MAX_KERNEL_SIZE = 21  # every kernel is zero-padded to this size so a batch convolves in one call


_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)

#: The keys of one degradation stage: name -> (type, first-stage default, second-stage default). The second stage's
#: keys end in "2" (`kernel_list2`, ...), as in Real-ESRGAN's option files; `DegradationConfig` has both sets.
STAGE_KEYS: dict[str, tuple[Any, Any, Any]] = {
    "kernel_list": (tuple[str, ...], KERNEL_TYPES, KERNEL_TYPES),
    "kernel_prob": (tuple[float, ...], _KERNEL_PROB, _KERNEL_PROB),
    "kernel_size_range": (tuple[int, int], (7, 21), (7, 21)),
    "sinc_prob": (float, 0.1, 0.1),
    "blur_sigma": (tuple[float, float], (0.2, 3.0), (0.2, 1.5)),
    "betag_range": (tuple[float, float], (0.5, 4.0), (0.5, 4.0)),
    "betap_range": (tuple[float, float], (1.0, 2.0), (1.0, 2.0)),
    "resize_prob": (tuple[float, float, float], (0.2, 0.7, 0.1), (0.3, 0.4, 0.3)),
    "resize_range": (tuple[float, float], (0.15, 1.5), (0.3, 1.2)),
    "gaussian_noise_prob": (float, 0.5, 0.5),
    "noise_range": (tuple[float, float], (1.0, 30.0), (1.0, 25.0)),
    "poisson_scale_range": (tuple[float, float], (0.05, 3.0), (0.05, 2.5)),
    "gray_noise_prob": (float, 0.4, 0.4),
    "jpeg_range": (tuple[float, float], (30.0, 95.0), (30.0, 95.0)),
}


def _stage_fields(stage: int) -> list[tuple[str, Any, Any]]:
    suffix = "2" if stage else ""
    return [(name + suffix, kind, dataclasses.field(default=row[stage])) for name, (kind, *row) in STAGE_KEYS.items()]


#: The two stages' fields (`kernel_list`, ..., `second_blur_prob`, `kernel_list2`, ...), built from `STAGE_KEYS`.
_StageFields = dataclasses.make_dataclass(
    "_StageFields",
    [*_stage_fields(0), ("second_blur_prob", float, dataclasses.field(default=0.8)), *_stage_fields(1)],
)
_StageFields.__module__ = __name__


@dataclass
class DegradationConfig(_StageFields):
    """Parameters of the second-order degradation; defaults = Real-ESRGAN x4plus (SeeSR's training data).

    Ranges are `(low, high)` with low <= high; probability lists sum to 1. The keys of each blur / resize / noise /
    JPEG stage are `STAGE_KEYS`, once for the first stage and once, ending in "2", for the second (e.g. `jpeg_range`,
    `jpeg_range2`); `second_blur_prob` is the probability that the second stage blurs at all. See
    docs/degradation.md for one line per key.
    """

    scale: int = 4
    usm_sharpen_gt: bool = True
    usm_radius: int = 50
    usm_weight: float = 0.5
    usm_threshold: float = 10.0
    # final stage and output
    final_sinc_prob: float = 0.8
    final_kernel_size_range: tuple[int, int] = (7, 21)
    per_sample_resize: bool = False
    resize_lq_to_gt: bool = False
    quantize_lq: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
                setattr(self, f.name, value)
            _check_type(f.name, value, f.default)
        _check_int_range("scale", self.scale, 1, 16)
        _check_int_range("usm_radius", self.usm_radius, 1, 1000)
        for suffix in ("", "2"):
            names, probs = getattr(self, f"kernel_list{suffix}"), getattr(self, f"kernel_prob{suffix}")
            unknown = [n for n in names if n not in KERNEL_TYPES]
            if unknown or not names:
                raise ValueError(f"kernel_list{suffix}={names!r}: expected a non-empty subset of {KERNEL_TYPES}")
            _check_probs(f"kernel_prob{suffix}", probs, len(names))
            _check_probs(f"resize_prob{suffix}", getattr(self, f"resize_prob{suffix}"), 3)
            _check_range(f"blur_sigma{suffix}", getattr(self, f"blur_sigma{suffix}"), 1e-3, 100.0)
            _check_range(f"betag_range{suffix}", getattr(self, f"betag_range{suffix}"), 1e-3, 100.0)
            _check_range(f"betap_range{suffix}", getattr(self, f"betap_range{suffix}"), 1e-3, 100.0)
            _check_range(f"resize_range{suffix}", getattr(self, f"resize_range{suffix}"), 1e-3, 100.0)
            _check_range(f"noise_range{suffix}", getattr(self, f"noise_range{suffix}"), 0.0, 255.0)
            _check_range(f"poisson_scale_range{suffix}", getattr(self, f"poisson_scale_range{suffix}"), 0.0, 100.0)
            _check_range(f"jpeg_range{suffix}", getattr(self, f"jpeg_range{suffix}"), 1.0, 100.0)
            _check_kernel_sizes(f"kernel_size_range{suffix}", getattr(self, f"kernel_size_range{suffix}"))
        _check_kernel_sizes("final_kernel_size_range", self.final_kernel_size_range)
        for name in ("sinc_prob", "sinc_prob2", "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob",
                     "gray_noise_prob2", "second_blur_prob", "final_sinc_prob", "usm_weight"):  # fmt: skip
            _check_range(name, (getattr(self, name),) * 2, 0.0, 1.0)
        _check_range("usm_threshold", (self.usm_threshold,) * 2, 0.0, 255.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationConfig:
        """Build from a mapping (e.g. a YAML `degradation:` block); unknown keys and wrong types are errors."""
        if not isinstance(data, dict):
            raise TypeError(f"degradation config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown degradation config keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DegradationConfig:
        """Load a YAML file holding the keys, either at the top level or under one `degradation:` key."""
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and set(data) == {"degradation"}:
            data = data["degradation"]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (YAML-safe) copy: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check_type(name: str, value: Any, default: Any) -> None:
    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = number(value)
    else:  # tuple: of strings (kernel lists) or of numbers
        item_ok = (lambda x: isinstance(x, str)) if isinstance(default[0], str) else number
        ok = isinstance(value, tuple) and all(item_ok(x) for x in value)
    if not ok:
        raise TypeError(f"{name}={value!r}: expected the type of the default {default!r}")


def _check_range(name: str, value: tuple[float, ...], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name}={value!r}: expected (low, high) with {low} <= low <= high <= {high}")


def _check_int_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r}: expected an int in [{low}, {high}]")


def _check_probs(name: str, probs: tuple[float, ...], count: int) -> None:
    if len(probs) != count or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{name}={probs!r}: expected {count} non-negative probabilities summing to 1")


def _check_kernel_sizes(name: str, value: tuple[int, ...]) -> None:
    if (
        len(value) != 2
        or not all(isinstance(v, int) and v % 2 == 1 for v in value)
        or not 3 <= value[0] <= value[1] <= MAX_KERNEL_SIZE
    ):
        raise ValueError(f"{name}={value!r}: expected odd (low, high) with 3 <= low <= high <= {MAX_KERNEL_SIZE}")


@dataclass
class DegradationOutput:
    """`gt`: the training target (USM-sharpened when configured), (B, 3, H, W) in [0, 1].
    `lq`: the degraded input, (B, 3, H/scale, W/scale), or (B, 3, H, W) with `resize_lq_to_gt`."""

    gt: torch.Tensor
    lq: torch.Tensor


# ----------------------------------------------------------------------------------------------- random draws


def _uniform(generator: torch.Generator, n: int, low: float | torch.Tensor, high: float | torch.Tensor):
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)


def _bernoulli(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64) < p


def _choice(generator: torch.Generator, n: int, probs: tuple[float, ...]) -> torch.Tensor:
    weights = torch.tensor(probs, dtype=torch.float64, device=generator.device)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _odd_sizes(generator: torch.Generator, n: int, size_range: tuple[int, int]) -> torch.Tensor:
    choices = torch.arange(size_range[0], size_range[1] + 1, 2, device=generator.device)
    return choices[torch.randint(len(choices), (n,), generator=generator, device=generator.device)]


def _resize_scales(generator: torch.Generator, n: int, probs: tuple[float, ...], scale_range: tuple[float, float]):
    kind = _choice(generator, n, probs)  # 0 up, 1 down, 2 keep
    up = _uniform(generator, n, 1.0, scale_range[1])
    down = _uniform(generator, n, scale_range[0], 1.0)
    return torch.where(kind == 0, up, torch.where(kind == 1, down, torch.ones_like(up)))


# ----------------------------------------------------------------------------------------------------- kernels


def _grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _crop_to_size(kernels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zero everything outside each kernel's centred `size` x `size` window and renormalise to sum 1."""
    xx, yy = _grid(kernels.shape[-1], kernels.device)
    radius = ((sizes - 1) // 2).to(torch.float64)[:, None, None]
    inside = (xx.abs() <= radius) & (yy.abs() <= radius)
    kernels = kernels * inside
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def gaussian_kernels(
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    rotation: torch.Tensor,
    beta: torch.Tensor,
    plateau: torch.Tensor,
    size: int = MAX_KERNEL_SIZE,
) -> torch.Tensor:
    """Bivariate (generalized / plateau) Gaussian kernels, (B, size, size), each summing to 1.

    With q = x^T Sigma^-1 x and Sigma = R(rotation) diag(sigma_x^2, sigma_y^2) R^T:
    Gaussian = exp(-q / 2) (beta = 1), generalized = exp(-q^beta / 2), plateau = 1 / (q^beta + 1).
    All arguments are (B,) tensors; `plateau` is boolean.
    """
    xx, yy = _grid(size, sigma_x.device)
    cos, sin = torch.cos(rotation)[:, None, None], torch.sin(rotation)[:, None, None]
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    q = (u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2
    qb = q ** beta[:, None, None]
    kernels = torch.where(plateau[:, None, None], 1.0 / (qb + 1.0), torch.exp(-0.5 * qb))
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def sinc_kernels(cutoff: torch.Tensor, size: int = MAX_KERNEL_SIZE) -> torch.Tensor:
    """Circular low-pass (2D sinc) kernels, (B, size, size), each summing to 1; `cutoff` (B,) in radians.

    k(r) = cutoff * J1(cutoff * r) / (2 pi r), with the limit cutoff^2 / (4 pi) at the centre.
    """
    xx, yy = _grid(size, cutoff.device)
    r = torch.sqrt(xx**2 + yy**2)[None]
    c = cutoff[:, None, None]
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    kernels = torch.where(
        r > 0, c * torch.special.bessel_j1(c * safe_r) / (2 * math.pi * safe_r), c**2 / (4 * math.pi)
    )
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def delta_kernels(n: int, device: torch.device, size: int = MAX_KERNEL_SIZE) -> torch.Tensor:
    """Identity kernels (a single 1 at the centre), (n, size, size)."""
    kernels = torch.zeros(n, size, size, dtype=torch.float64, device=device)
    kernels[:, size // 2, size // 2] = 1.0
    return kernels


def sample_blur_kernels(
    generator: torch.Generator,
    n: int,
    kernel_list: tuple[str, ...],
    kernel_prob: tuple[float, ...],
    size_range: tuple[int, int],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_prob: float,
) -> torch.Tensor:
    """Draw `n` random blur kernels as Real-ESRGAN does, zero-padded to (n, 21, 21), float64, on the generator's
    device. Sides are odd sizes in `size_range`; with `sinc_prob` a sinc with cutoff in [pi/3, pi] (side < 13) or
    [pi/5, pi]; otherwise a type from `kernel_list` with `kernel_prob`, sigmas in `sigma_range`, rotation in
    [-pi, pi] (aniso), and shape beta drawn half the time below 1 and half above 1 within the beta range."""
    sizes = _odd_sizes(generator, n, size_range)
    kind = torch.tensor([KERNEL_TYPES.index(k) for k in kernel_list], device=generator.device)
    kind = kind[_choice(generator, n, kernel_prob)]
    iso = kind % 2 == 0
    sigma_x = _uniform(generator, n, *sigma_range)
    sigma_y = torch.where(iso, sigma_x, _uniform(generator, n, *sigma_range))
    rotation = torch.where(iso, torch.zeros_like(sigma_x), _uniform(generator, n, -math.pi, math.pi))
    generalized, plateau = kind // 2 == 1, kind // 2 == 2
    below = _bernoulli(generator, n, 0.5)
    beta_g = torch.where(
        below, _uniform(generator, n, betag_range[0], 1.0), _uniform(generator, n, 1.0, betag_range[1])
    )
    beta_p = torch.where(
        below, _uniform(generator, n, betap_range[0], 1.0), _uniform(generator, n, 1.0, betap_range[1])
    )
    beta = torch.where(generalized, beta_g, torch.where(plateau, beta_p, torch.ones_like(beta_g)))
    kernels = gaussian_kernels(sigma_x, sigma_y, rotation, beta, plateau)
    low = torch.where(sizes < 13, math.pi / 3, math.pi / 5).to(torch.float64)
    sinc = sinc_kernels(_uniform(generator, n, low, math.pi))
    kernels = torch.where(_bernoulli(generator, n, sinc_prob)[:, None, None], sinc, kernels)
    return _crop_to_size(kernels, sizes)


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image (B, C, H, W) with its own kernel (B, k, k), k odd, with reflect padding."""
    b, c, h, w = images.shape
    k = kernels.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    x = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(images).repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(x, weight, groups=b * c).reshape(b, c, h, w)


def usm_sharpen(images: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking as in Real-ESRGAN: sharpen by `weight` x (image - Gaussian blur) where the residual exceeds
    `threshold`/255, blended through a blurred mask. The Gaussian has side `radius` (+1 if even) and OpenCV's
    default sigma for that side, 0.3 * ((side - 1) / 2 - 1) + 0.8."""
    side = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((side - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(side, dtype=torch.float64, device=images.device) - (side - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = (g / g.sum()).to(images.dtype)

    def blur(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pad = side // 2
        mode = "reflect" if pad < h and pad < w else "replicate"
        x = F.pad(x.reshape(b * c, 1, h, w), (pad, pad, pad, pad), mode=mode)
        x = F.conv2d(F.conv2d(x, g.view(1, 1, 1, side)), g.view(1, 1, side, 1))
        return x.reshape(b, c, h, w)

    residual = images - blur(images)
    mask = (residual.abs() * 255 > threshold).to(images.dtype)
    soft_mask = blur(mask)
    sharp = (images + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images


# ------------------------------------------------------------------------------------------- resize, noise, jpeg


def resize(images: torch.Tensor, size: tuple[int, int], modes: torch.Tensor) -> torch.Tensor:
    """Resize each sample to `size` with its own mode index into RESIZE_MODES (modes: (B,) long)."""
    out = images.new_empty(images.shape[0], images.shape[1], *size)
    for index, mode in enumerate(RESIZE_MODES):
        chosen = (modes == index).nonzero().flatten()
        if chosen.numel():
            extra = {} if mode == "area" else {"align_corners": False}
            out[chosen] = F.interpolate(images[chosen], size=size, mode=mode, **extra)
    return out


def _on_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return x.to(device=device, dtype=dtype if dtype is not None else x.dtype)


def _poisson_noise(images: torch.Tensor, gray: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson(x * v) / v - x on the 8-bit-rounded images (on the luma, shared by R, G, B, where `gray`)."""
    x = (images.clamp(0, 1) * 255).round() / 255
    luma = (x * x.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    gray = gray[:, None, None, None]
    src = torch.where(gray, luma.expand_as(x), x)
    offsets = 256 * torch.arange(len(x), device=x.device)[:, None, None, None]
    levels = (src * 255).round().long().clamp(0, 255) + offsets
    distinct = (torch.bincount(levels.flatten(), minlength=256 * len(x)).view(-1, 256) > 0).sum(1)
    vals = (2.0 ** torch.ceil(torch.log2(distinct.to(torch.float64)))).to(x.dtype)[:, None, None, None]
    rate = _on_device(src * vals, generator.device, torch.float32)
    drawn = _on_device(torch.poisson(rate, generator=generator), images.device, x.dtype)
    noise = drawn / vals - src
    return torch.where(gray, noise[:, :1].expand_as(noise), noise)


def add_noise(
    images: torch.Tensor,
    gaussian: torch.Tensor,
    sigma: torch.Tensor,
    poisson_scale: torch.Tensor,
    gray: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Add per-sample noise and clamp to [0, 1]. For samples with `gaussian` True: N(0, sigma/255) noise; else
    Poisson noise: Poisson(x * v) / v - x, times `poisson_scale`, with v the number of distinct 8-bit levels of
    the sample rounded up to a power of two. `gray` samples get one noise plane (computed on the luma for
    Poisson) shared by the three channels. All arguments but `images` are (B,) on `images`' device."""
    b, c, h, w = images.shape
    gen_device = generator.device
    noise = _on_device(torch.randn(b, c, h, w, generator=generator, device=gen_device), images.device, images.dtype)
    noise = noise * (sigma.to(images.dtype) / 255.0)[:, None, None, None]
    noise = torch.where(gray[:, None, None, None], noise[:, :1].expand_as(noise), noise)
    chosen = (~gaussian).nonzero().flatten()
    if chosen.numel():
        scale = poisson_scale[chosen].to(images.dtype)[:, None, None, None]
        noise[chosen] = _poisson_noise(images[chosen], gray[chosen], generator) * scale
    return (images + noise).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ the chain


@dataclass
class _StageParams:
    kernel: torch.Tensor  # (B, 21, 21); a delta where the stage does not blur
    resize_scale: torch.Tensor  # (B,)
    resize_mode: torch.Tensor  # (B,) index into RESIZE_MODES
    gaussian: torch.Tensor  # (B,) bool: Gaussian (True) or Poisson noise
    sigma: torch.Tensor
    poisson_scale: torch.Tensor
    gray: torch.Tensor
    jpeg_quality: torch.Tensor


@dataclass
class _Params:
    stages: tuple[_StageParams, _StageParams]
    final_sinc: torch.Tensor  # (B, 21, 21); a delta where there is no final sinc
    sinc_first: torch.Tensor  # (B,) bool: resize + sinc before the final JPEG
    final_mode: torch.Tensor
    back_mode: torch.Tensor  # resize mode of the OSEDiff resize back to the GT size

    def map(self, fn: Any) -> _Params:
        """Apply `fn` to every tensor (e.g. move to a device, slice one sample)."""

        def apply(obj: Any) -> dict[str, Any]:
            return {f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "stages"}

        return _Params(stages=tuple(_StageParams(**apply(s)) for s in self.stages), **apply(self))


def _sample_stage(cfg: DegradationConfig, suffix: str, n: int, generator: torch.Generator) -> _StageParams:
    def opt(name: str) -> Any:
        return getattr(cfg, f"{name}{suffix}")

    kernel = sample_blur_kernels(
        generator, n, opt("kernel_list"), opt("kernel_prob"), opt("kernel_size_range"), opt("blur_sigma"),
        opt("betag_range"), opt("betap_range"), opt("sinc_prob"),
    )  # fmt: skip
    if suffix == "2":
        blur = _bernoulli(generator, n, cfg.second_blur_prob)[:, None, None]
        kernel = torch.where(blur, kernel, delta_kernels(n, generator.device))
    return _StageParams(
        kernel=kernel,
        resize_scale=_resize_scales(generator, n, opt("resize_prob"), opt("resize_range")),
        resize_mode=torch.randint(len(RESIZE_MODES), (n,), generator=generator, device=generator.device),
        gaussian=_bernoulli(generator, n, opt("gaussian_noise_prob")),
        sigma=_uniform(generator, n, *opt("noise_range")),
        poisson_scale=_uniform(generator, n, *opt("poisson_scale_range")),
        gray=_bernoulli(generator, n, opt("gray_noise_prob")),
        jpeg_quality=_uniform(generator, n, *opt("jpeg_range")),
    )


def _sample_params(cfg: DegradationConfig, n: int, generator: torch.Generator, device: torch.device) -> _Params:
    stages = (_sample_stage(cfg, "", n, generator), _sample_stage(cfg, "2", n, generator))
    sinc = sinc_kernels(_uniform(generator, n, math.pi / 3, math.pi))
    sinc = _crop_to_size(sinc, _odd_sizes(generator, n, cfg.final_kernel_size_range))
    use_sinc = _bernoulli(generator, n, cfg.final_sinc_prob)[:, None, None]
    params = _Params(
        stages=stages,
        final_sinc=torch.where(use_sinc, sinc, delta_kernels(n, generator.device)),
        sinc_first=_bernoulli(generator, n, 0.5),
        final_mode=torch.randint(len(RESIZE_MODES), (n,), generator=generator, device=generator.device),
        back_mode=torch.randint(len(RESIZE_MODES), (n,), generator=generator, device=generator.device),
    )
    return params.map(lambda t: t.to(device))


def _degrade_stages(x: torch.Tensor, p: _Params, scale: int, generator: torch.Generator) -> torch.Tensor:
    """Both stages down to the final resize; the intermediate resizes use sample 0's scale and mode."""
    h, w = x.shape[-2:]
    for index, stage in enumerate(p.stages):
        x = filter2d(x, stage.kernel)
        r = stage.resize_scale[0].item()
        size = (max(1, int(h * r)), max(1, int(w * r))) if index == 0 else (int(h / scale * r), int(w / scale * r))
        x = resize(x, (max(1, size[0]), max(1, size[1])), stage.resize_mode[:1].expand(x.shape[0]))
        x = add_noise(x, stage.gaussian, stage.sigma, stage.poisson_scale, stage.gray, generator)
        if index == 0:
            x = jpeg_compress(x, stage.jpeg_quality)
    return x


def _final_stage(x: torch.Tensor, p: _Params, size: tuple[int, int]) -> torch.Tensor:
    """Resize to the LQ size + final sinc and JPEG, in per-sample random order."""
    out = x.new_empty(x.shape[0], x.shape[1], *size)
    quality = p.stages[1].jpeg_quality
    for sinc_first in (True, False):
        chosen = (p.sinc_first == sinc_first).nonzero().flatten()
        if not chosen.numel():
            continue
        y = x[chosen]
        if not sinc_first:
            y = jpeg_compress(y, quality[chosen])
        y = filter2d(resize(y, size, p.final_mode[chosen]), p.final_sinc[chosen])
        if sinc_first:
            y = jpeg_compress(y, quality[chosen])
        out[chosen] = y
    return out


def _check_inputs(gt: torch.Tensor, config: DegradationConfig, generator: torch.Generator) -> None:
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"config must be a DegradationConfig, got {type(config).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(gt, torch.Tensor) or gt.ndim != 4 or gt.shape[1] != 3 or not gt.is_floating_point():
        got = f"{tuple(gt.shape)} {gt.dtype}" if isinstance(gt, torch.Tensor) else type(gt).__name__
        raise ValueError(f"gt must be a float tensor of shape (B, 3, H, W) in [0, 1], got {got}")
    h, w = gt.shape[-2:]
    if h % config.scale or w % config.scale or h < 2 * config.scale or w < 2 * config.scale:
        raise ValueError(f"gt size {h}x{w} must be divisible by scale={config.scale} and at least 2 * scale")


def degrade(gt: torch.Tensor, config: DegradationConfig, generator: torch.Generator) -> DegradationOutput:
    """Synthesize LQ inputs from HQ images with the Real-ESRGAN second-order degradation.

    Args:
        gt: (B, 3, H, W) float images in [0, 1], H and W divisible by `config.scale`; any device.
        config: the degradation parameters.
        generator: the source of every random choice; its device is where random numbers are drawn (a generator
            on the images' device avoids copies). The same generator state gives the same output.

    Returns:
        DegradationOutput with `gt` (USM-sharpened if `config.usm_sharpen_gt`) and `lq`, (B, 3, H/scale, W/scale),
        or (B, 3, H, W) with `config.resize_lq_to_gt`; both in [0, 1] with the dtype of `gt` (fp16/bf16 inputs
        are processed in float32).
    """
    _check_inputs(gt, config, generator)
    work = gt.to(torch.promote_types(gt.dtype, torch.float32))
    params = _sample_params(config, gt.shape[0], generator, gt.device)
    target = (
        usm_sharpen(work, config.usm_radius, config.usm_weight, config.usm_threshold)
        if config.usm_sharpen_gt
        else work
    )
    h, w = gt.shape[-2:]
    lq_size = (h // config.scale, w // config.scale)
    if config.per_sample_resize:
        pieces = [
            _degrade_stages(target[i : i + 1], params.map(lambda t, i=i: t[i : i + 1]), config.scale, generator)
            for i in range(len(gt))
        ]
        lq = torch.cat(
            [_final_stage(x, params.map(lambda t, i=i: t[i : i + 1]), lq_size) for i, x in enumerate(pieces)]
        )
    else:
        lq = _final_stage(_degrade_stages(target, params, config.scale, generator), params, lq_size)
    if config.resize_lq_to_gt:
        lq = resize(lq, (h, w), params.back_mode)
    lq = lq.clamp(0, 1)
    if config.quantize_lq:
        lq = (lq * 255).round() / 255
    return DegradationOutput(gt=target.to(gt.dtype), lq=lq.to(gt.dtype))


def degraded_condition(
    gt: torch.Tensor, degradation: DegradationConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, condition) for HR crops in [0, 1]: the (USM-sharpened) GT, and the degraded LQ bicubic-upscaled
    back to the GT size in [0, 1] (the original's ``sr_bicubic``). Runs on ``gt``'s device."""
    out = degrade(gt, degradation, generator)
    lq = out.lq
    if lq.shape[-2:] != gt.shape[-2:]:
        lq = F.interpolate(lq.float(), size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return out.gt, lq.to(gt.dtype)
