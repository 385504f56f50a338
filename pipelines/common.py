"""What SeeSRPipeline and OSEDiffPipeline share: input checks, LQ pre-processing, the VAE round trip, outputs.

The pre-processed LQ batch is kept as **uint8** when every input is a PIL image (a quarter of the float32 size: the
full-resolution image is the largest buffer a large call keeps) and read as float (value / 255, exactly as
``ToTensor``) where it is used: per latent tile for the ControlNet, per VAE window for the encoder. The AdaIN
colour fix needs only the reference's per-channel statistics, computed once from the float batch at
pre-processing (:class:`LQBatch`). Tensor inputs stay float.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from seesr.color import adain_stats
from seesr.conditioning import encode_prompt
from seesr.image_io import pil_to_tensor, pil_to_uint8, unit_float

from .vae_tiling import tiled_decode, tiled_encode

ImageInput = PIL.Image.Image | torch.Tensor | Sequence[PIL.Image.Image | torch.Tensor]


def to_tensor(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return pil_to_tensor(image) if isinstance(image, PIL.Image.Image) else image.float()


def upscale_image(
    image: PIL.Image.Image | torch.Tensor,
    upscale: float,
    process_size: int,
    rgb_first: bool = False,
    multiple_resample: int = PIL.Image.BICUBIC,
    same_size_noop: bool = False,
) -> tuple[PIL.Image.Image | torch.Tensor, tuple[int, int]]:
    """The originals' LQ pre-processing: (upscaled image, ``upscale`` x the input size as (width, height)).

    An image with a side under ``process_size // upscale`` is first resized so its short side is that (``int()``
    truncation); then bicubic x``upscale``; then resized to sides that are multiples of 8 with
    ``multiple_resample`` (SeeSR: bicubic, OSEDiff: LANCZOS). PIL images use PIL (converted to RGB first with
    ``rgb_first``, as OSEDiff); (3, h, w) tensors in [0, 1] torch bicubic (antialiased when shrinking, skipping
    same-size resizes with ``same_size_noop``).
    """
    is_pil = isinstance(image, PIL.Image.Image)
    width, height = image.size if is_pil else (image.shape[-1], image.shape[-2])
    exact_size = (int(width * upscale), int(height * upscale))

    def resize(img, size: tuple[int, int], resample=PIL.Image.BICUBIC):
        if is_pil:
            return img.resize(size, resample)
        if same_size_noop and size == (img.shape[-1], img.shape[-2]):
            return img
        down = size[0] < img.shape[-1] or size[1] < img.shape[-2]
        out = F.interpolate(img[None].float(), size=(size[1], size[0]), mode="bicubic", antialias=down)
        return out[0].clamp(0, 1)

    if is_pil and rgb_first:
        image = image.convert("RGB")
    min_side = int(process_size // upscale)
    if width < min_side or height < min_side:
        scale = min_side / min(width, height)
        width, height = int(scale * width), int(scale * height)
        image = resize(image, (width, height))
    image = resize(image, (int(width * upscale), int(height * upscale)))
    w, h = image.size if is_pil else (image.shape[-1], image.shape[-2])
    if w < 8 or h < 8:
        raise ValueError(f"image: the upscaled image is {w}x{h}, smaller than 8 pixels on a side")
    return resize(image, (w - w % 8, h - h % 8), multiple_resample), exact_size


def resize_outputs(images: torch.Tensor, sizes: list[tuple[int, int]], output_type: str):
    """(B, 3, H, W) images in [0, 1] resized (torch bicubic) to their final (width, height) ``sizes``, as a
    (B, 3, h, w) tensor or (B, h, w, 3) array for ``output_type`` "pt" / "np"; a list when the sizes differ."""
    resized = [
        F.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True).clamp(0, 1)[0]
        if (w, h) != (image.shape[-1], image.shape[-2])
        else image
        for image, (w, h) in zip(images, sizes, strict=True)
    ]
    if len(set(sizes)) > 1:  # originals of different sizes: one tensor / array per image
        return [r.cpu().permute(1, 2, 0).numpy() if output_type == "np" else r for r in resized]
    images = torch.stack(resized)
    return images.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else images


def to_pil_list(images: torch.Tensor, sizes: list[tuple[int, int]] | None) -> list[PIL.Image.Image]:
    """(B, 3, H, W) values in [0, 255] (overwritten) truncated to 8 bits, as PIL images PIL-bicubic resized to
    ``sizes`` (None: as they are)."""
    arrays = images.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pils = [PIL.Image.fromarray(a) for a in arrays]
    if sizes is None:
        return pils
    return [p if p.size == s else p.resize(s, PIL.Image.BICUBIC) for p, s in zip(pils, sizes, strict=True)]


@dataclass
class LQBatch:
    """The pre-processed LQ batch: ``pixels`` (B, 3, H, W) uint8 (value / 255) or float in [0, 1] on the device;
    ``sizes``: each image's final (width, height); ``adain``: the float32 batch's :func:`adain_stats` (the AdaIN
    colour-fix reference) when computed."""

    pixels: torch.Tensor | None
    sizes: list[tuple[int, int]]
    adain: tuple[torch.Tensor, torch.Tensor] | None = None

    def unit(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The batch as float in [0, 1] (a full-size copy when it is kept as uint8)."""
        return unit_float(self.pixels, dtype)

    def add_color_reference(self, method: str | None) -> None:
        """For ``method="adain"``: compute the reference's statistics now, from a transient float32 copy."""
        if method == "adain" and self.adain is None:
            # contiguous at once: the statistics flatten it, which would copy a channels-last batch a second time
            pixels = self.pixels.to(memory_format=torch.contiguous_format)
            self.adain = adain_stats(unit_float(pixels))

    def release(self, method: str | None):
        """What :func:`seesr.color.color_fix` needs for ``method`` (AdaIN's statistics; wavelet: the float32 image;
        None: nothing); the pixels are dropped unless they are that image."""
        if method == "adain":
            self.add_color_reference(method)
            self.pixels = None
            return self.adain
        reference = self.unit(torch.float32) if method is not None else None
        self.pixels = None
        return reference


class _vae_in_dtype:
    """Run the VAE in ``dtype`` inside the block (a no-op when it already is), restoring it afterwards."""

    def __init__(self, vae: AutoencoderKL, dtype: torch.dtype):
        self.vae, self.dtype, self.saved = vae, dtype, vae.dtype

    def __enter__(self):
        if self.saved != self.dtype:
            torch.nn.Module.to(self.vae, dtype=self.dtype)

    def __exit__(self, *exc):
        if self.saved != self.dtype:
            torch.nn.Module.to(self.vae, dtype=self.saved)


def _canonical(x: torch.Tensor) -> bool:
    """Whether ``x`` has the packed contiguous or channels-last strides that an out-of-place elementwise result would
    get: then an in-place result has the layout (hence the next convolution's algorithm) of the stock one."""
    if x.ndim != 4:
        return False
    _, c, h, w = x.shape
    return x.stride() in ((c * h * w, h * w, w, 1), (h * w * c, 1, w * c, c))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=_canonical(x))


def _lean_resnet_forward(block: nn.Module, original):
    """``ResnetBlock2D.forward`` for the VAE's case (no time embedding, no resampling, output scale 1) with the
    SiLUs and the residual add in place where the layout allows and without the division by 1: the same operations
    on the same values (addition commutes exactly), without up to three full-size allocations per block. Other
    calls take ``original``."""

    def forward(input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if temb is not None or args or kwargs or block.training:
            return original(input_tensor, temb, *args, **kwargs)
        hidden = _silu(block.norm1(input_tensor))  # the norms return new tensors
        hidden = _silu(block.norm2(block.conv1(hidden)))
        hidden = block.conv2(block.dropout(hidden))
        shortcut = block.conv_shortcut(input_tensor) if block.conv_shortcut is not None else input_tensor
        if hidden.stride() == shortcut.stride() and _canonical(hidden):
            return hidden.add_(shortcut)
        return shortcut + hidden  # the stock sum (its memory layout)

    return forward


class lean_vae_resnets:
    """Inside the block, the VAE's ``ResnetBlock2D``s whose configuration allows it run
    :func:`_lean_resnet_forward` (bitwise the same outputs; measured in docs/benchmarks.md)."""

    def __init__(self, vae: nn.Module):
        from diffusers.models.resnet import ResnetBlock2D

        self.blocks = [
            m
            for m in vae.modules()
            if type(m) is ResnetBlock2D
            and m.upsample is None
            and m.downsample is None
            and m.time_emb_proj is None
            and m.output_scale_factor == 1
            and m.time_embedding_norm != "scale_shift"  # without temb: norm2 alone
            and isinstance(m.nonlinearity, nn.SiLU)
            and "forward" not in vars(m)
        ]

    def __enter__(self):
        for block in self.blocks:
            block.forward = _lean_resnet_forward(block, block.forward)

    def __exit__(self, *exc):
        for block in self.blocks:
            del block.forward


class SRPipelineMixin:
    """Methods shared by the SeeSR-family pipelines (mixed into a ``DiffusionPipeline`` with ``vae``,
    ``text_encoder``, ``tokenizer``, ``unet`` and an ``InstalledCodeLoaderMixin``)."""

    #: The pipeline's pre-processing options for :func:`upscale_image`.
    preprocess_options: dict[str, Any] = {}
    #: OSEDiff maps the LQ to [-1, 1] in float32 and then casts it to the VAE's dtype; SeeSR casts first.
    encode_in_float32 = False
    #: Memory layout of a one-image LQ batch: SeeSR keeps ToTensor's (H, W, C) strides (channels-last), OSEDiff a
    #: contiguous stack. Convolutions may round differently in the two layouts; each keeps its established outputs.
    contiguous_lq = False
    #: Tiled VAE mode (:mod:`pipelines.vae_tiling`): True, GroupNorm statistics of the whole image (one window pass
    #: per GroupNorm layer); False, the original's fast mode (statistics of the image shrunk to one window, one
    #: pass: much faster, less close to the untiled VAE). Both use the same windows, so the same peak memory.
    vae_tiling_exact = True

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` plus a two-line loader file, so that the folder also loads with
        ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` (it imports this installed package)."""
        super().save_pretrained(save_directory, **kwargs)
        self._write_loader(save_directory)

    @staticmethod
    def _as_list(image: ImageInput) -> list[PIL.Image.Image | torch.Tensor]:
        if isinstance(image, PIL.Image.Image):
            return [image]
        if isinstance(image, torch.Tensor):
            return list(image) if image.ndim == 4 else [image]
        return list(image)

    def call_inputs(self, image: ImageInput, prompt: str | list[str], tensor_inputs: list[str] | None):
        """A call's images as a list, one prompt per image, and the callback's tensor names (default latents)."""
        images = self._as_list(image)
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        return images, prompts, tensor_inputs or ["latents"]

    @staticmethod
    def check_images_and_prompts(images: list, prompts: list) -> None:
        if not images:
            raise ValueError("image: expected at least one image, got an empty list")
        for i, img in enumerate(images):
            if isinstance(img, torch.Tensor):
                if img.ndim != 3 or img.shape[0] != 3 or not img.is_floating_point():
                    raise ValueError(
                        f"image[{i}]: a tensor image must be float (3, H, W) in [0, 1], got {img.dtype} "
                        f"{tuple(img.shape)}"
                    )
            elif not isinstance(img, PIL.Image.Image):
                raise TypeError(f"image[{i}]: expected a PIL image or a torch tensor, got {type(img).__name__}")
        if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: expected a string or {len(images)} strings (one per image), got {prompts!r}")

    def prepare_lq(self, images: list, upscale: float, process_size: int) -> LQBatch:
        """The pre-processed batch on the execution device: uint8 when every image is a PIL image, else float32."""
        upscaled, sizes = zip(
            *(upscale_image(img, upscale, process_size, **self.preprocess_options) for img in images), strict=True
        )
        pil = all(isinstance(u, PIL.Image.Image) for u in upscaled)
        tensors = [pil_to_uint8(u) if pil else to_tensor(u) for u in upscaled]
        del upscaled
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"image: all images of a batch must have the same size after pre-processing, got {shapes}"
            )
        batch = tensors[0][None] if len(tensors) == 1 and not self.contiguous_lq else torch.stack(tensors)
        return LQBatch(batch.to(self._execution_device), list(sizes))

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """CLIP token embeddings of ``prompts``, in the UNet's dtype."""
        embeds = encode_prompt(self.tokenizer, self.text_encoder, prompts, self._execution_device)
        return embeds.to(dtype=self.unet.dtype)

    def _vae_dtype(self, upcast_vae: bool) -> torch.dtype:
        return torch.float32 if upcast_vae else self.vae.dtype

    @torch.no_grad()
    def encode_lq(self, lq: torch.Tensor, generator, vae_tile_size: int | None, upcast_vae: bool) -> torch.Tensor:
        """Scaled VAE latents sampled (with ``generator``; None: torch's global RNG) from the LQ in [0, 1]
        (uint8 or float); above ``vae_tile_size`` pixels tiled with image-wide GroupNorm statistics."""
        dtype = self._vae_dtype(upcast_vae)
        with _vae_in_dtype(self.vae, dtype), lean_vae_resnets(self.vae):
            if vae_tile_size is not None and max(lq.shape[-2:]) > vae_tile_size:
                # GroupNorm statistics of the whole image, one window's activations at a time (vae_tiling.py).
                tile = vae_tile_size // self.vae_scale_factor * self.vae_scale_factor
                # unit_range: each window is mapped to [-1, 1] (uint8: value / 255) on its own
                posterior = tiled_encode(self.vae, lq, tile, exact=self.vae_tiling_exact, unit_range=True)
            elif self.encode_in_float32:
                posterior = self.vae.encode((unit_float(lq) * 2 - 1).to(dtype)).latent_dist
            else:
                posterior = self.vae.encode(unit_float(lq, dtype) * 2 - 1).latent_dist
            latents = posterior.sample(generator=generator)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor, vae_tile_size: int | None, upcast_vae: bool) -> torch.Tensor:
        """The VAE decoder's output (about [-1, 1], in the VAE's dtype) for scaled ``latents``; above
        ``vae_tile_size`` pixels tiled with image-wide GroupNorm statistics."""
        with _vae_in_dtype(self.vae, self._vae_dtype(upcast_vae)), lean_vae_resnets(self.vae):
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            if vae_tile_size is not None and max(latents.shape[-2:]) * self.vae_scale_factor > vae_tile_size:
                return tiled_decode(
                    self.vae, latents, vae_tile_size // self.vae_scale_factor, exact=self.vae_tiling_exact
                )
            return self.vae.decode(latents, return_dict=False)[0]
