"""SeeSRPipeline: semantics-aware real-world super-resolution (SeeSR, CVPR 2024) as a diffusers pipeline.

Reproduces the original ``test_seesr.py`` + ``pipeline_seesr.py`` behaviour (see docs/pipeline.md):

1. Pre-processing: an LQ image smaller than ``process_size // upscale`` on a side is first resized (PIL bicubic)
   so its short side is ``process_size // upscale``; then bicubic x``upscale``; then cropped by resizing to a
   multiple of 8. This image is the ControlNet condition, the LR-latent source and the colour-fix reference. The
   output is finally resized (bicubic) to ``upscale`` x the original size.
2. DAPE (``prompt_extractor``) runs on the *original* LQ image: its tags start the prompt, its representation
   tokens feed RCA. Prompt = ``f"{tags}, {prompt},"`` + ``added_prompt`` (without DAPE: ``f"{prompt},"`` +
   ``added_prompt``). Both classifier-free-guidance halves see the DAPE tokens.
3. Start point ``"lr"``: the LQ latent noised to ``start_timestep`` (999, as the original, although its first
   denoising step is 981 with 50 DDPM steps; pass ``start_timestep=None`` to noise to the first step instead;
   schedulers other than DDPM / DDIM start at their own first step), or ``"noise"``. All randomness (VAE sample,
   noise, DDPM steps) comes from ``generator``. Any diffusers scheduler can be swapped in with ``from_config``:
   each ``step`` gets only the arguments it accepts.
4. Latent tiling with Gaussian blending above ``latent_tile_size**2`` latent pixels; VAE tiling above
   ``vae_tile_size`` pixels; colour fix ``adain`` / ``wavelet`` / None.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import dape.model  # noqa: F401  (registers the prompt_extractor's module for diffusers' component loader)
from seesr.color import COLOR_FIX_METHODS, color_fix
from seesr.conditioning import build_condition
from seesr.denoise import SeeSRCondition, predict_noise
from seesr.models.controlnet import SeeSRControlNetModel
from seesr.models.unet import SeeSRUNet2DConditionModel

from .common import ImageInput, LQBatch, SRPipelineMixin, resize_outputs, to_pil_list, to_tensor, upscale_image
from .loading import InstalledCodeLoaderMixin
from .tiling import blended_prediction, needs_latent_tiling

logger = logging.getLogger(__name__)

#: Stable Diffusion 2 base's scheduler config (its scheduler/ folder), which SeeSR reads into a DDPMScheduler:
#: 50 steps give timesteps 981, 961, ..., 1.
SD2_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
DEFAULT_ADDED_PROMPT = "clean, high-resolution, 8k"
DEFAULT_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
START_POINTS = ("lr", "noise")
REMOTE_CODE_FILE = "pipeline_seesr"
#: The call defaults a folder may override (``sampling_defaults`` in its model_index.json, e.g. SeeSR-Turbo's);
#: a caller's explicit value always wins. These are the original ``test_seesr.py``'s.
SAMPLING_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 5.5, "latent_tile_overlap": 16}


@dataclass
class SeeSRPipelineOutput(BaseOutput):
    """``images``: PIL list, (B, H, W, 3) float array or (B, 3, H, W) tensor in [0, 1]; ``prompts``: text used."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    prompts: list[str]


def preprocess_lq(
    image: PIL.Image.Image | torch.Tensor, upscale: float, process_size: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One LQ image -> ((3, H, W) upscaled condition in [0, 1], final output size (width, height)).

    PIL inputs follow the original exactly (PIL bicubic); (3, h, w) tensors in [0, 1] use torch bicubic.
    """
    image, final_size = upscale_image(image, upscale, process_size)
    return to_tensor(image), final_size


class SeeSRPipeline(SRPipelineMixin, InstalledCodeLoaderMixin, DiffusionPipeline):
    r"""SeeSR super-resolution: DAPE prompts + ControlNet with RCA over a frozen Stable Diffusion UNet.

    Components: ``vae`` (AutoencoderKL), ``text_encoder`` + ``tokenizer`` (CLIP), ``unet``
    (:class:`~seesr.models.unet.SeeSRUNet2DConditionModel`), ``controlnet``
    (:class:`~seesr.models.controlnet.SeeSRControlNetModel`), ``scheduler`` (DDPM with the SD2 config by default;
    any diffusers scheduler via ``from_config``) and the optional ``prompt_extractor`` (:class:`~dape.DAPEModel`).
    Without a prompt extractor the caller's prompt is used and RCA sees ``image_embeds`` if given, or is skipped
    (the UNet and ControlNet then run their stock paths).
    """

    model_cpu_offload_seq = "prompt_extractor->text_encoder->controlnet->unet->vae"
    _optional_components = ["prompt_extractor"]
    _callback_tensor_inputs = ["latents"]
    loader_file = REMOTE_CODE_FILE

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: SeeSRUNet2DConditionModel,
        controlnet: SeeSRControlNetModel,
        scheduler: SchedulerMixin,
        prompt_extractor: torch.nn.Module | None = None,
        sampling_defaults: dict[str, Any] | None = None,
        model_kind: str = "seesr",
    ):
        super().__init__()
        for name, module, cls in (
            ("unet", unet, SeeSRUNet2DConditionModel),
            ("controlnet", controlnet, SeeSRControlNetModel),
        ):
            if not isinstance(module, cls):
                raise TypeError(
                    f"{name} must be a {cls.__name__} (load SeeSR folders with {cls.__name__}.from_pretrained; a "
                    f"stock diffusers class silently drops the RCA weights), got {type(module).__name__}"
                )
        models = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
        self.register_modules(**models, controlnet=controlnet, scheduler=scheduler, prompt_extractor=prompt_extractor)
        unknown = sorted(set(sampling_defaults or {}) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(
                f"sampling_defaults: unknown keys {unknown}, expected some of {sorted(SAMPLING_DEFAULTS)}"
            )
        # Stored in model_index.json: SeeSR-Turbo folders hold model_kind "seesr-turbo" and turbo's defaults.
        self.register_to_config(sampling_defaults=dict(sampling_defaults or {}), model_kind=model_kind)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        #: Compute the ControlNet conditioning embedding once per image / tile instead of every step (bitwise the
        #: same result; False recomputes it every step, as the original), keeping at most this many MiB of them
        #: (tiles beyond it are recomputed per step, so peak memory stays flat in the image size).
        self.cache_control_embedding = True
        self.control_embedding_cache_mib = 64

    def sampling_default(self, name: str, value: Any = None) -> Any:
        """``value`` if given, else this folder's stored default (``sampling_defaults``), else the original's."""
        if value is not None:
            return value
        stored = self.config.get("sampling_defaults") or {}
        return stored.get(name, SAMPLING_DEFAULTS[name])

    # Inputs ------------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        images: list,
        prompts: list[str],
        negative_prompt: str | list[str],
        upscale: float,
        process_size: int,
        num_inference_steps: int,
        guidance_scale: float,
        start_point: str,
        start_timestep: int | None,
        image_embeds: torch.Tensor | None,
        latent_tile_size: int | None,
        latent_tile_overlap: int,
        vae_tile_size: int | None,
        color_fix_method: str | None,
        output_type: str,
        generator: torch.Generator | list[torch.Generator] | None,
        num_images_per_prompt: int,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        self.check_images_and_prompts(images, prompts)
        if not isinstance(negative_prompt, str) and len(negative_prompt) != len(images):
            raise ValueError(f"negative_prompt: expected a string or {len(images)} strings, got {negative_prompt!r}")
        checks = [
            (upscale >= 1, "upscale", upscale, "a number >= 1"),
            (process_size >= 8, "process_size", process_size, "an integer >= 8"),
            (num_inference_steps >= 1, "num_inference_steps", num_inference_steps, "an integer >= 1"),
            (guidance_scale >= 0, "guidance_scale", guidance_scale, "a number >= 0"),
            (start_point in START_POINTS, "start_point", start_point, f"one of {START_POINTS}"),
            (color_fix_method in COLOR_FIX_METHODS, "color_fix", color_fix_method, f"one of {COLOR_FIX_METHODS}"),
            (output_type in OUTPUT_TYPES, "output_type", output_type, f"one of {OUTPUT_TYPES}"),
            (num_images_per_prompt >= 1, "num_images_per_prompt", num_images_per_prompt, "an integer >= 1"),
            (latent_tile_size is None or latent_tile_size >= 8, "latent_tile_size", latent_tile_size, "None or >= 8"),
            (
                0 <= latent_tile_overlap < (latent_tile_size or 1 << 30),
                "latent_tile_overlap",
                latent_tile_overlap,
                "0 <= overlap < latent_tile_size",
            ),
            (vae_tile_size is None or vae_tile_size >= 64, "vae_tile_size", vae_tile_size, "None or >= 64 pixels"),
        ]
        if start_timestep is not None:
            steps = self.scheduler.config.num_train_timesteps
            checks.append((0 <= start_timestep < steps, "start_timestep", start_timestep, f"None or in [0, {steps})"))
        for ok, name, value, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
        if image_embeds is not None:
            dim = self.unet.config.image_cross_attention_dim
            if image_embeds.ndim != 3 or image_embeds.shape[0] not in (1, len(images)) or image_embeds.shape[2] != dim:
                raise ValueError(
                    f"image_embeds: expected shape (1 or {len(images)}, N, {dim}), got {tuple(image_embeds.shape)}"
                )
        if isinstance(generator, list) and len(generator) != len(images) * num_images_per_prompt:
            raise ValueError(
                f"generator: a list needs one generator per output image "
                f"({len(images) * num_images_per_prompt}), got {len(generator)}"
            )
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {self._callback_tensor_inputs}")

    # Latents -----------------------------------------------------------------------------------------------------

    def noise_to_timestep(
        self, latents: torch.Tensor, noise: torch.Tensor, timestep: int | torch.Tensor, first_step: bool = False
    ) -> torch.Tensor:
        """``latents`` diffused to ``timestep`` in the scheduler's own sample space.

        DDPM / DDIM: their ``add_noise`` at any timestep (the original's start at t=999). Other schedulers at their own
        first timestep (``first_step``): their ``add_noise`` (sigma-space schedulers scale by their first sigma,
        Karras / exponential sigmas included). Elsewhere: ``sqrt(a) x + sqrt(1 - a) n`` with ``a = alphas_cumprod[t]``,
        divided by ``sqrt(a)`` in sigma space (``init_noise_sigma > 1``).
        """
        if isinstance(self.scheduler, DDPMScheduler | DDIMScheduler):
            return self.scheduler.add_noise(latents, noise, torch.tensor([int(timestep)], device=latents.device))
        if first_step and hasattr(self.scheduler, "add_noise"):
            timesteps = torch.as_tensor(timestep, device=latents.device).reshape(1)
            return self.scheduler.add_noise(latents, noise, timesteps).to(latents.dtype)
        timestep = int(round(float(timestep)))
        alpha = self.scheduler.alphas_cumprod[timestep].to(device=latents.device, dtype=torch.float32)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if float(self.scheduler.init_noise_sigma) > 1:  # sigma-space schedulers (Euler, Heun, LMS, ...)
            noisy = noisy / alpha.sqrt()
        return noisy.to(latents.dtype)

    def prepare_latents(
        self,
        lq: torch.Tensor,
        timesteps: torch.Tensor,
        start_point: str,
        start_timestep: int | None,
        generator,
        vae_tile_size: int | None,
        upcast_vae: bool,
    ) -> torch.Tensor:
        height, width = lq.shape[-2] // self.vae_scale_factor, lq.shape[-1] // self.vae_scale_factor
        shape = (lq.shape[0], self.unet.config.in_channels, height, width)
        device, dtype = self._execution_device, self.unet.dtype
        if start_point == "noise":
            return (
                randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
            )
        # The original draws the start noise, then its DDPM step noises, from the generator, and samples the VAE
        # posterior from the global RNG. The posterior gets its own stream derived from `generator` here, so the
        # generator's sequence is the original's (and with generator=None everything follows the original's order).
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        lr_latents = self.encode_lq(lq, _posterior_generator(generator), vae_tile_size, upcast_vae).to(dtype)
        if start_timestep is None or not isinstance(self.scheduler, DDPMScheduler | DDIMScheduler):
            # Only DDPM / DDIM step from any noise level; the others start where their own schedule starts.
            return self.noise_to_timestep(lr_latents, noise, timesteps[0], first_step=True)
        return self.noise_to_timestep(lr_latents, noise, start_timestep)

    # Denoising ---------------------------------------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: SeeSRCondition,
        conditioning_scale: float,
        tile_size: int | None,
        tile_overlap: int,
    ) -> torch.Tensor:
        """The denoiser's prediction for ``latents``, tiled with Gaussian blending when the latent is large."""
        if not needs_latent_tiling(*latents.shape[-2:], tile_size):
            return predict_noise(self.unet, self.controlnet, latents, timestep, cond, conditioning_scale)

        def predict_tile(tile: torch.Tensor, region: tuple[int, int, int, int]) -> torch.Tensor:
            tile_cond = cond.crop(*region, self.vae_scale_factor)
            return predict_noise(self.unet, self.controlnet, tile, timestep, tile_cond, conditioning_scale)

        return blended_prediction(latents, tile_size, tile_overlap, predict_tile)

    # Outputs -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, vae_tile_size: int | None, upcast_vae: bool) -> torch.Tensor:
        """(B, 3, H, W) float32 images in [0, 1]."""
        return self.vae_decode(latents, vae_tile_size, upcast_vae).float().div_(2).add_(0.5).clamp_(0, 1)

    @staticmethod
    def postprocess(
        images: torch.Tensor,
        reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        sizes: list[tuple[int, int]],
        method: str | None,
        output_type: str,
    ):
        """Colour fix against the LQ condition (``reference``: the image, or its AdaIN statistics), then resize to
        ``upscale`` x the original size. ``images`` (float32 in [0, 1]) is overwritten.

        ``"pil"`` follows the original's rounding: decoded images are rounded to 8 bits, colour-fixed, truncated to
        8 bits, then PIL-bicubic resized. ``"np"`` / ``"pt"`` stay in float and resize with torch bicubic.
        """
        if output_type == "pil":  # in place: `images` is the pipeline's own decoded batch
            images = images.mul_(255).round_().div_(255)
        images = color_fix(images, reference, method, inplace=True)
        if output_type == "pil":
            return to_pil_list(images.mul_(255), sizes)
        return resize_outputs(images, sizes, output_type)

    # The call ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        prompt: str | list[str] = "",
        added_prompt: str = DEFAULT_ADDED_PROMPT,
        negative_prompt: str | list[str] = DEFAULT_NEGATIVE_PROMPT,
        image_embeds: torch.Tensor | None = None,
        upscale: float = 4,
        process_size: int = 512,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        conditioning_scale: float = 1.0,
        start_point: str = "lr",
        start_timestep: int | None = 999,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latent_tile_size: int | None = 64,
        latent_tile_overlap: int | None = None,
        vae_tile_size: int | None = 512,
        upcast_vae: bool = False,
        color_fix: str | None = "adain",
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> SeeSRPipelineOutput | tuple:
        r"""Super-resolve ``image`` (PIL images, or float (3, H, W) / (B, 3, H, W) tensors in [0, 1]).

        Args:
            prompt: the user prompt (one, or one per image), appended after the DAPE tags.
            added_prompt / negative_prompt: the original's defaults.
            image_embeds: RCA tokens (B, N, image_cross_attention_dim) to use instead of DAPE's.
            upscale / process_size: scale factor (any >= 1) and the original's small-input rule.
            num_inference_steps / guidance_scale / conditioning_scale: sampling; CFG is on when guidance_scale > 1.
                None (also for latent_tile_overlap): the folder's ``sampling_defaults`` (SeeSR-Turbo: 2 steps,
                guidance 1, overlap 32), else the original's 50 steps, guidance 5.5, overlap 16.
            start_point / start_timestep: ``"lr"`` noises the LQ latent to ``start_timestep`` (None: the first
                step; schedulers other than DDPM / DDIM always start at their first step, in their own sample
                space); ``"noise"`` starts from pure noise (scaled by the scheduler's ``init_noise_sigma``).
            generator: one generator, or one per output image (then a batch equals separate runs).
            latent_tile_size / latent_tile_overlap: latent tiling (None disables); vae_tile_size: VAE tiling in
                pixels (None disables). upcast_vae: run the VAE in float32 (avoids fp16 NaNs).
            color_fix: ``"adain"``, ``"wavelet"`` or None. output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, {name: tensor})`` -> dict that may replace ``latents``.
        """
        # 1. Check inputs.
        num_inference_steps = self.sampling_default("num_inference_steps", num_inference_steps)
        guidance_scale = self.sampling_default("guidance_scale", guidance_scale)
        latent_tile_overlap = self.sampling_default("latent_tile_overlap", latent_tile_overlap)
        images, prompts, tensor_inputs = self.call_inputs(image, prompt, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            images,
            prompts,
            negative_prompt,
            upscale,
            process_size,
            num_inference_steps,
            guidance_scale,
            start_point,
            start_timestep,
            image_embeds,
            latent_tile_size,
            latent_tile_overlap,
            vae_tile_size,
            color_fix,
            output_type,
            generator,
            num_images_per_prompt,
            tensor_inputs,
        )
        device, repeats = self._execution_device, num_images_per_prompt
        do_cfg = guidance_scale > 1

        # 2. Pre-process the LQ images; the condition (once per image): DAPE tags and tokens from the original LQ,
        # the text embeddings of [negative, positive] prompts for classifier-free guidance, and one copy of the LQ
        # and the DAPE tokens that serves both halves (the denoiser repeats them per tile, so no doubled
        # full-resolution condition is kept).
        lq = self.prepare_lq(images, upscale, process_size)
        negatives = [negative_prompt] * len(images) if isinstance(negative_prompt, str) else list(negative_prompt)
        cond, full_prompts = build_condition(
            lq.pixels,
            prompts,
            self.tokenizer,
            self.text_encoder,
            dape=self.prompt_extractor,
            dape_images=images,
            added_prompt=added_prompt,
            negative_prompts=negatives if do_cfg else None,
            image_embeds=image_embeds,
            dtype=self.unet.dtype,
        )
        if repeats > 1:
            lq = LQBatch(lq.pixels.repeat_interleave(repeats, dim=0), [s for s in lq.sizes for _ in range(repeats)])
            cond = cond.repeat_interleave(repeats)
        lq.add_color_reference(color_fix)  # AdaIN: only the reference's statistics are kept for the colour fix
        if self.cache_control_embedding:  # the ControlNet's condition embedding, once per image/tile (exact)
            cond = dataclasses.replace(
                cond, embedding_cache={}, embedding_cache_bytes=int(self.control_embedding_cache_mib * 2**20)
            )

        # 3. Timesteps and the starting latents.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            lq.pixels, timesteps, start_point, start_timestep, generator, vae_tile_size, upcast_vae
        )

        # 4. Denoise. Each scheduler gets only the keyword arguments its step() accepts (e.g. generator).
        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.predict(
                    model_input, t, cond, conditioning_scale, latent_tile_size, latent_tile_overlap
                )
                if do_cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
                progress.update()

        # 5. Decode, colour-fix, resize.
        del cond
        reference = lq.release(color_fix)  # what the colour fix needs; the full-size LQ is dropped when not that
        if output_type == "latent":
            result = latents
        else:
            # No name keeps the decoded batch: postprocess overwrites it (no full-size copy beside it).
            result = self.postprocess(
                self.decode_latents(latents, vae_tile_size, upcast_vae), reference, lq.sizes, color_fix, output_type
            )
        self.maybe_free_model_hooks()
        prompts_used = [p for p in full_prompts for _ in range(repeats)]
        if not return_dict:
            return result, prompts_used
        return SeeSRPipelineOutput(images=result, prompts=prompts_used)


def _accepts(function: Callable, name: str) -> bool:
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _posterior_generator(generator):
    """A generator (or list) for the VAE posterior sample, seeded from ``generator`` without advancing it."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [_posterior_generator(g) for g in generator]
    return torch.Generator(device=generator.device).manual_seed(generator.initial_seed() ^ 0x5EE5)
