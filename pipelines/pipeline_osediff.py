"""OSEDiffPipeline: one-step real-world super-resolution (OSEDiff, NeurIPS 2024) as a diffusers pipeline.

Reproduces the original ``test_osediff.py`` + ``OSEDiff_test.forward`` (see docs/onestep.md):

1. Pre-processing: an LQ image with a side under ``process_size // upscale`` is first resized (PIL bicubic) so its
   short side is ``process_size // upscale``; then bicubic x``upscale``; then LANCZOS to multiples of 8. This image
   is the model input, the DAPE input (unlike SeeSR, which tags the original LQ) and the colour-fix reference.
2. Prompt ``f"{tags}, {prompt},"`` from DAPE's tags (without a prompt extractor: ``f"{prompt},"``).
3. VAE encoder with its LoRA -> posterior **sample** x scaling factor; UNet with its LoRA at t=999; x0 with the
   scheduler's float32 alpha-bar (:func:`seesr.models.onestep.onestep_x0`); decode; clamp to [-1, 1].
4. ``"pil"`` output: 8-bit truncation, colour fix (adain default / wavelet / None) in float32, truncation again.
5. Output size: ``size_rule="exact"`` (default) resizes to exactly ``upscale`` x the input size (PIL bicubic);
   ``size_rule="original"`` keeps the processed size, as the original (its final resize is discarded), so the
   result matches it pixel for pixel.

Large inputs: latent tiling with Gaussian blending above ``latent_tile_size**2`` latent pixels (original: 96 / 32,
no CFG) and VAE tiling above ``vae_tile_size`` pixels, so memory stays flat in the image size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import dape.model  # noqa: F401  (registers the prompt_extractor's module for diffusers' component loader)
from seesr.color import COLOR_FIX_METHODS, color_fix
from seesr.conditioning import compose_prompt, dape_condition, encode_prompt
from seesr.models.onestep import ONESTEP_TIMESTEP, as_onestep_model, fuse_lora, has_lora, onestep_x0

from .loading import InstalledCodeLoaderMixin
from .pipeline_seesr import _to_tensor, _vae_in_dtype, resize_outputs
from .tiling import gaussian_weights, needs_latent_tiling, tile_grid, vae_tiling

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SIZE_RULES = ("exact", "original")
REMOTE_CODE_FILE = "pipeline_osediff"

ImageInput = PIL.Image.Image | torch.Tensor | Sequence[PIL.Image.Image | torch.Tensor]


@dataclass
class OSEDiffPipelineOutput(BaseOutput):
    """``images``: PIL list, (B, H, W, 3) float array or (B, 3, H, W) tensor in [0, 1]; ``prompts``: text used."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    prompts: list[str]


def preprocess_osediff(
    image: PIL.Image.Image | torch.Tensor, upscale: float, process_size: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One LQ image -> ((3, H, W) model input in [0, 1], ``upscale`` x the input size as (width, height)).

    PIL inputs follow ``test_osediff.py`` exactly (bicubic, bicubic, LANCZOS); (3, h, w) tensors in [0, 1] use
    torch bicubic (antialiased when shrinking) for every step.
    """
    is_pil = isinstance(image, PIL.Image.Image)
    width, height = image.size if is_pil else (image.shape[-1], image.shape[-2])
    exact_size = (int(width * upscale), int(height * upscale))

    def resize(img, size: tuple[int, int], resample=PIL.Image.BICUBIC):
        if is_pil:
            return img.resize(size, resample)
        if size == (img.shape[-1], img.shape[-2]):
            return img
        down = size[0] < img.shape[-1] or size[1] < img.shape[-2]
        out = F.interpolate(img[None].float(), size=(size[1], size[0]), mode="bicubic", antialias=down)
        return out[0].clamp(0, 1)

    if is_pil:
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
    image = resize(image, (w - w % 8, h - h % 8), PIL.Image.LANCZOS)
    return _to_tensor(image), exact_size


class OSEDiffPipeline(InstalledCodeLoaderMixin, DiffusionPipeline):
    r"""OSEDiff one-step super-resolution: a LoRA-tuned Stable Diffusion 2.1-base VAE encoder and UNet, one step.

    Components: ``vae`` (AutoencoderKL, its encoder with OSEDiff's LoRA), ``unet`` (UNet2DConditionModel with
    OSEDiff's three LoRA adapters and its ``conv_in``), ``text_encoder`` + ``tokenizer`` (CLIP), ``scheduler``
    (DDPM with the SD2 config: only its ``alphas_cumprod`` is used) and the optional ``prompt_extractor``
    (:class:`~dape.DAPEModel`). The LoRA is either kept as peft adapters (saved next to the base weights, see
    :mod:`seesr.models.onestep`) or fused; ``fuse_lora=True`` (also as a ``from_pretrained`` argument) fuses it.
    ``timestep`` (saved in ``model_index.json``) is the UNet's timestep of the one step: 999 as OSEDiff (the default,
    also for folders without the key); a model trained with another (``train_osediff.py``'s ``timestep``) keeps it.
    """

    model_cpu_offload_seq = "prompt_extractor->text_encoder->unet->vae"
    _optional_components = ["prompt_extractor"]
    _callback_tensor_inputs = ["latents"]
    loader_file = REMOTE_CODE_FILE

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        prompt_extractor: torch.nn.Module | None = None,
        fuse_lora: bool = False,
        timestep: int = ONESTEP_TIMESTEP,
    ):
        super().__init__()
        for name, module, cls in (("unet", unet, UNet2DConditionModel), ("vae", vae, AutoencoderKL)):
            if not isinstance(module, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(module).__name__}")
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"scheduler must be a DDPM-family scheduler with alphas_cumprod, got {type(scheduler)}")
        if not (isinstance(timestep, int) and 0 <= timestep < len(scheduler.alphas_cumprod)):
            raise ValueError(f"timestep: expected an int in [0, {len(scheduler.alphas_cumprod)}), got {timestep!r}")
        # Adapter-aware saving: the one-step classes carry their LoRA in saved folders (no state is added).
        unet, vae = as_onestep_model(unet), as_onestep_model(vae)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            prompt_extractor=prompt_extractor,
        )
        self.register_to_config(timestep=timestep)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if fuse_lora:
            self.fuse_lora()

    def fuse_lora(self) -> None:
        """Merge the UNet's and the VAE's LoRA into their base weights (faster; outputs equal to rounding)."""
        for model in (self.unet, self.vae):
            if has_lora(model):
                fuse_lora(model)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` (adapters saved next to the base weights) plus a two-line loader
        file, so that ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` also loads the folder."""
        super().save_pretrained(save_directory, **kwargs)
        self._write_loader(save_directory)

    # Inputs ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _as_list(image: ImageInput) -> list[PIL.Image.Image | torch.Tensor]:
        if isinstance(image, PIL.Image.Image):
            return [image]
        if isinstance(image, torch.Tensor):
            return list(image) if image.ndim == 4 else [image]
        return list(image)

    def check_inputs(self, images: list, prompts: list, generator, tensor_inputs: list[str], **options: Any) -> None:
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
        tile, overlap = options["latent_tile_size"], options["latent_tile_overlap"]
        checks = [
            (options["upscale"] >= 1, "upscale", "a number >= 1"),
            (options["process_size"] >= 8, "process_size", "an integer >= 8"),
            (options["color_fix"] in COLOR_FIX_METHODS, "color_fix", f"one of {COLOR_FIX_METHODS}"),
            (options["output_type"] in OUTPUT_TYPES, "output_type", f"one of {OUTPUT_TYPES}"),
            (options["size_rule"] in SIZE_RULES, "size_rule", f"one of {SIZE_RULES}"),
            (tile is None or tile >= 8, "latent_tile_size", "None or >= 8"),
            (0 <= overlap < (tile or 1 << 30), "latent_tile_overlap", "0 <= overlap < latent_tile_size"),
            (options["vae_tile_size"] is None or options["vae_tile_size"] >= 64, "vae_tile_size", "None or >= 64"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {options[name]!r}")
        if isinstance(generator, list) and len(generator) != len(images):
            raise ValueError(f"generator: a list needs one generator per image ({len(images)}), got {len(generator)}")
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {self._callback_tensor_inputs}")

    def prepare_lq(
        self, images: list, upscale: float, process_size: int
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(B, 3, H, W) model inputs in [0, 1] on the execution device, and each image's ``upscale`` x size."""
        tensors, sizes = zip(*(preprocess_osediff(img, upscale, process_size) for img in images), strict=True)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"image: all images of a batch must have the same size after pre-processing, got {shapes}"
            )
        return torch.stack(tensors).to(self._execution_device), list(sizes)

    def build_prompts(self, lq: torch.Tensor, prompts: list[str]) -> list[str]:
        """``f"{tags}, {prompt},"`` with DAPE's tags of the pre-processed (upscaled) images, as the original."""
        tags = [None] * len(prompts)
        if self.prompt_extractor is not None:
            extractor_device = self.prompt_extractor.device
            tags, _ = dape_condition(self.prompt_extractor, list(lq.to(extractor_device)))
        return [compose_prompt(t, p, "") for t, p in zip(tags, prompts, strict=True)]

    # Model stages ------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """CLIP token embeddings of ``prompts``, in the UNet's dtype."""
        embeds = encode_prompt(self.tokenizer, self.text_encoder, prompts, self._execution_device)
        return embeds.to(dtype=self.unet.dtype)

    @torch.no_grad()
    def encode_lq(self, lq: torch.Tensor, generator, vae_tile_size: int | None, upcast_vae: bool) -> torch.Tensor:
        """Scaled latents: a sample (from ``generator``; None: torch's global RNG, as the original) of the LoRA VAE
        encoder's posterior of ``lq * 2 - 1`` (computed in float32, then cast, as the original)."""
        dtype = torch.float32 if upcast_vae else self.vae.dtype
        with vae_tiling(self.vae, vae_tile_size), _vae_in_dtype(self.vae, dtype):
            posterior = self.vae.encode((lq.float() * 2 - 1).to(dtype)).latent_dist
            latents = posterior.sample(generator=generator)
        return latents * self.vae.config.scaling_factor

    def predict_noise(
        self, latents: torch.Tensor, embeds: torch.Tensor, tile_size: int | None, tile_overlap: int, progress
    ) -> torch.Tensor:
        """The UNet's noise prediction at ``config.timestep`` (999), tiled with Gaussian blending when large."""
        timestep = torch.tensor([self.config.timestep], device=latents.device)
        height, width = latents.shape[-2:]
        if not needs_latent_tiling(height, width, tile_size):
            noise_pred = self.unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
            progress.update()
            return noise_pred
        total = torch.zeros(latents.shape, device=latents.device, dtype=torch.float32)
        weight_sum = torch.zeros((height, width), device=latents.device, dtype=torch.float32)
        for top, left, tile_h, tile_w in tile_grid(height, width, tile_size, tile_overlap):
            weights = gaussian_weights(tile_h, tile_w, device=latents.device).float()
            tile = latents[:, :, top : top + tile_h, left : left + tile_w]
            pred = self.unet(tile, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
            total[:, :, top : top + tile_h, left : left + tile_w] += pred.float() * weights
            weight_sum[top : top + tile_h, left : left + tile_w] += weights
            progress.update()
        return (total / weight_sum).to(latents.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, vae_tile_size: int | None, upcast_vae: bool) -> torch.Tensor:
        """Decoded images in [-1, 1] (clamped), in the VAE's dtype."""
        dtype = torch.float32 if upcast_vae else self.vae.dtype
        with vae_tiling(self.vae, vae_tile_size), _vae_in_dtype(self.vae, dtype):
            images = self.vae.decode(latents.to(dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return images.clamp_(-1, 1)

    @staticmethod
    def postprocess(
        decoded: torch.Tensor,
        reference: torch.Tensor,
        sizes: list[tuple[int, int]] | None,
        method: str | None,
        output_type: str,
    ):
        """Colour fix against the pre-processed LQ, then (``sizes`` given) resize to ``sizes``. ``decoded`` (in
        [-1, 1]) is overwritten in place.

        ``"pil"`` follows the original's 8-bit chain: ``x * 0.5 + 0.5`` truncated to 8 bits (``ToPILImage``),
        colour-fixed in float32, clamped and truncated again, PIL-bicubic resized. ``"np"`` / ``"pt"`` stay in float
        (at least float32) and resize with torch bicubic.
        """
        # In place where the values allow: full-size copies are what grows with the image size.
        images = decoded.mul_(0.5).add_(0.5)
        if output_type == "pil":
            # trunc of [0, 255] = the uint8 conversion; the 8-bit values then in float32, as ToTensor gives them
            images = images.mul_(255).trunc_().to(torch.float32).div_(255)
            images = color_fix(images, reference.float(), method).clamp_(0, 1)
            arrays = images.mul_(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            pils = [PIL.Image.fromarray(a) for a in arrays]
            if sizes is None:
                return pils
            return [p if p.size == s else p.resize(s, PIL.Image.BICUBIC) for p, s in zip(pils, sizes, strict=True)]
        images = images.to(torch.promote_types(images.dtype, torch.float32))
        images = color_fix(images, reference.to(images.dtype), method).clamp_(0, 1)
        if sizes is not None:
            return resize_outputs(images, sizes, output_type)
        return images.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else images

    # The call ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        prompt: str | list[str] = "",
        upscale: float = 4,
        process_size: int = 512,
        generator: torch.Generator | list[torch.Generator] | None = None,
        size_rule: str = "exact",
        color_fix: str | None = "adain",
        latent_tile_size: int | None = 96,
        latent_tile_overlap: int = 32,
        vae_tile_size: int | None = 512,
        upcast_vae: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> OSEDiffPipelineOutput | tuple:
        r"""Super-resolve ``image`` (PIL images, or float (3, H, W) / (B, 3, H, W) tensors in [0, 1]) in one step.

        Args:
            prompt: the user prompt (one, or one per image), after the DAPE tags: ``f"{tags}, {prompt},"``.
            upscale / process_size: scale factor (>= 1) and the original's small-input rule (inputs with a side
                under ``process_size // upscale`` are enlarged first).
            generator: seeds the VAE posterior sample, the only randomness (one generator, or one per image).
                ``None`` draws from torch's global RNG like the original, so ``torch.manual_seed(s)`` before the
                call, or ``generator=torch.Generator().manual_seed(s)`` on CPU, gives the original's CPU result.
            size_rule: ``"exact"`` returns ``upscale`` x the input size; ``"original"`` the pre-processed size
                (small inputs enlarged, sides rounded down to multiples of 8), pixel for pixel the original's.
            color_fix: ``"adain"`` (the original's default), ``"wavelet"`` or None.
            latent_tile_size / latent_tile_overlap: latent tiling (None disables); vae_tile_size: VAE tiling in
                pixels (None disables). upcast_vae: run the VAE in float32 (avoids fp16 overflow).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the scaled x0 latents).
            callback_on_step_end: ``fn(pipe, 0, 999, {"latents": x0})`` -> dict that may replace ``latents``.
        """
        # 1. Check inputs.
        images = self._as_list(image)
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            images,
            prompts,
            generator,
            tensor_inputs,
            upscale=upscale,
            process_size=process_size,
            color_fix=color_fix,
            output_type=output_type,
            size_rule=size_rule,
            latent_tile_size=latent_tile_size,
            latent_tile_overlap=latent_tile_overlap,
            vae_tile_size=vae_tile_size,
        )

        # 2. Pre-process; DAPE tags of the upscaled images; text embeddings.
        lq, sizes = self.prepare_lq(images, upscale, process_size)
        full_prompts = self.build_prompts(lq, prompts)
        embeds = self.encode_prompt(full_prompts)

        # 3. One step: LoRA VAE encoder -> UNet at t=999 -> x0.
        latents = self.encode_lq(lq, generator, vae_tile_size, upcast_vae).to(self.unet.dtype)
        height, width = latents.shape[-2:]
        num_tiles = len(tile_grid(height, width, latent_tile_size, latent_tile_overlap)) if needs_latent_tiling(
            height, width, latent_tile_size
        ) else 1  # fmt: skip
        with self.progress_bar(total=num_tiles) as progress:
            noise_pred = self.predict_noise(latents, embeds, latent_tile_size, latent_tile_overlap, progress)
        latents = onestep_x0(latents, noise_pred, self.scheduler.alphas_cumprod, self.config.timestep)
        if callback_on_step_end is not None:
            outputs = callback_on_step_end(self, 0, torch.tensor(self.config.timestep), {"latents": latents})
            latents = outputs.pop("latents", latents)

        # 4. Decode, colour-fix, size.
        if output_type == "latent":
            result = latents
        else:
            del noise_pred
            decoded = self.decode_latents(latents, vae_tile_size, upcast_vae)
            del latents
            result = self.postprocess(decoded, lq, sizes if size_rule == "exact" else None, color_fix, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, full_prompts
        return OSEDiffPipelineOutput(images=result, prompts=full_prompts)


def default_scheduler() -> DDPMScheduler:
    """The SD2 base DDPM scheduler (OSEDiff reads ``alphas_cumprod[999]`` from it)."""
    from .pipeline_seesr import SD2_SCHEDULER_CONFIG

    return DDPMScheduler.from_config(SD2_SCHEDULER_CONFIG)
