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
no CFG) and VAE tiling above ``vae_tile_size`` pixels with image-wide GroupNorm statistics
(:mod:`pipelines.vae_tiling`, as the original's tiled VAE), so memory stays flat in the image size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import dape.model  # noqa: F401  (registers the prompt_extractor's module for diffusers' component loader)
from seesr.color import COLOR_FIX_METHODS, color_fix
from seesr.conditioning import compose_prompt, dape_condition
from seesr.image_io import unit_float
from seesr.models.onestep import ONESTEP_TIMESTEP, as_onestep_model, fuse_lora, has_lora, onestep_x0

from .common import ImageInput, SRPipelineMixin, resize_outputs, to_pil_list, to_tensor, upscale_image
from .loading import InstalledCodeLoaderMixin
from .tiling import blended_prediction, needs_latent_tiling, tile_grid

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SIZE_RULES = ("exact", "original")
REMOTE_CODE_FILE = "pipeline_osediff"


@dataclass
class OSEDiffPipelineOutput(BaseOutput):
    """``images``: PIL list, (B, H, W, 3) float array or (B, 3, H, W) tensor in [0, 1]; ``prompts``: text used."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    prompts: list[str]


#: The original's pre-processing (RGB first, LANCZOS to multiples of 8) for :func:`~pipelines.common.upscale_image`.
OSEDIFF_PREPROCESS = {"rgb_first": True, "multiple_resample": PIL.Image.LANCZOS, "same_size_noop": True}


def preprocess_osediff(
    image: PIL.Image.Image | torch.Tensor, upscale: float, process_size: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One LQ image -> ((3, H, W) model input in [0, 1], ``upscale`` x the input size as (width, height)).

    PIL inputs follow ``test_osediff.py`` exactly (bicubic, bicubic, LANCZOS); (3, h, w) tensors in [0, 1] use
    torch bicubic (antialiased when shrinking) for every step.
    """
    image, exact_size = upscale_image(image, upscale, process_size, **OSEDIFF_PREPROCESS)
    return to_tensor(image), exact_size


class OSEDiffPipeline(SRPipelineMixin, InstalledCodeLoaderMixin, DiffusionPipeline):
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
    preprocess_options = OSEDIFF_PREPROCESS
    encode_in_float32 = True  # the original maps the LQ to [-1, 1] in float32, then casts
    contiguous_lq = True

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
        models = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
        self.register_modules(**models, scheduler=scheduler, prompt_extractor=prompt_extractor)
        self.register_to_config(timestep=timestep)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if fuse_lora:
            self.fuse_lora()

    def fuse_lora(self) -> None:
        """Merge the UNet's and the VAE's LoRA into their base weights (faster; outputs equal to rounding)."""
        for model in (self.unet, self.vae):
            if has_lora(model):
                fuse_lora(model)

    # Inputs ------------------------------------------------------------------------------------------------------

    def check_inputs(self, images: list, prompts: list, generator, tensor_inputs: list[str], **options: Any) -> None:
        self.check_images_and_prompts(images, prompts)
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

    def build_prompts(self, lq: torch.Tensor, prompts: list[str]) -> list[str]:
        """``f"{tags}, {prompt},"`` with DAPE's tags of the pre-processed (upscaled) images in [0, 1] (uint8: value
        / 255), as the original."""
        tags = [None] * len(prompts)
        if self.prompt_extractor is not None:
            extractor_device = self.prompt_extractor.device
            tags, _ = dape_condition(self.prompt_extractor, list(unit_float(lq).to(extractor_device)))
        return [compose_prompt(t, p, "") for t, p in zip(tags, prompts, strict=True)]

    # Model stages ------------------------------------------------------------------------------------------------

    def predict_noise(
        self, latents: torch.Tensor, embeds: torch.Tensor, tile_size: int | None, tile_overlap: int, progress
    ) -> torch.Tensor:
        """The UNet's noise prediction at ``config.timestep`` (999 by default), tiled and blended when large."""
        timestep = torch.tensor([self.config.timestep], device=latents.device)

        def predict(tile: torch.Tensor, region: tuple | None = None) -> torch.Tensor:
            noise_pred = self.unet(tile, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
            progress.update()
            return noise_pred

        if not needs_latent_tiling(*latents.shape[-2:], tile_size):
            return predict(latents)
        return blended_prediction(latents, tile_size, tile_overlap, predict)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, vae_tile_size: int | None, upcast_vae: bool) -> torch.Tensor:
        """Decoded images in [-1, 1] (clamped), in the VAE's dtype (tiled above ``vae_tile_size`` pixels with
        image-wide GroupNorm statistics)."""
        return self.vae_decode(latents, vae_tile_size, upcast_vae).clamp_(-1, 1)

    @staticmethod
    def postprocess(
        decoded: torch.Tensor,
        reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        sizes: list[tuple[int, int]] | None,
        method: str | None,
        output_type: str,
    ):
        """Colour fix against the pre-processed LQ (``reference``: the float32 image, or its AdaIN statistics),
        then (``sizes`` given) resize to ``sizes``. ``decoded`` (in [-1, 1]) is overwritten in place.

        ``"pil"`` follows the original's 8-bit chain: ``x * 0.5 + 0.5`` truncated to 8 bits (``ToPILImage``),
        colour-fixed in float32, clamped and truncated again, PIL-bicubic resized. ``"np"`` / ``"pt"`` stay in float
        (at least float32) and resize with torch bicubic.
        """
        # In place where the values allow: full-size copies are what grows with the image size.
        images = decoded.mul_(0.5).add_(0.5)
        if output_type == "pil":
            # trunc of [0, 255] = the uint8 conversion; the 8-bit values then in float32, as ToTensor gives them
            images = images.mul_(255).trunc_().to(torch.float32).div_(255)
            images = color_fix(images, reference, method, inplace=True).clamp_(0, 1)
            return to_pil_list(images.mul_(255), sizes)
        images = images.to(torch.promote_types(images.dtype, torch.float32))
        images = color_fix(images, reference, method, inplace=True).clamp_(0, 1)
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
        images, prompts, tensor_inputs = self.call_inputs(image, prompt, callback_on_step_end_tensor_inputs)
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
        lq = self.prepare_lq(images, upscale, process_size)
        full_prompts = self.build_prompts(lq.pixels, prompts)
        embeds = self.encode_prompt(full_prompts)
        lq.add_color_reference(color_fix)  # AdaIN: only the reference's statistics are kept for the colour fix

        # 3. One step: LoRA VAE encoder -> UNet at t=999 -> x0.
        latents = self.encode_lq(lq.pixels, generator, vae_tile_size, upcast_vae).to(self.unet.dtype)
        reference = lq.release(color_fix)  # the full-size LQ is dropped unless the colour fix needs it (wavelet)
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
            sizes = lq.sizes if size_rule == "exact" else None
            result = self.postprocess(decoded, reference, sizes, color_fix, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, full_prompts
        return OSEDiffPipelineOutput(images=result, prompts=full_prompts)


def default_scheduler() -> DDPMScheduler:
    """The SD2 base DDPM scheduler (OSEDiff reads ``alphas_cumprod[999]`` from it)."""
    from .pipeline_seesr import SD2_SCHEDULER_CONFIG

    return DDPMScheduler.from_config(SD2_SCHEDULER_CONFIG)
