"""The SeeSR denoiser step shared by training and the pipeline: ControlNet, then UNet.

Value ranges: ``control_image`` is the bicubic-upscaled LQ in [0, 1] (as SeeSR; float, or uint8 read as value / 255,
which keeps a large image at a quarter of the float32 size); latents are VAE latents scaled by
``vae.config.scaling_factor``; ``image_embeds`` are the DAPE representation tokens (B, N, 512) or None (RCA skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seesr.image_io import unit_float


@dataclass
class SeeSRCondition:
    """Everything the denoiser is conditioned on, for one batch of latents."""

    prompt_embeds: torch.Tensor
    control_image: torch.Tensor
    image_embeds: torch.Tensor | None = None
    #: When a dict, the ControlNet conditioning embedding of ``control_image`` (which does not change between steps)
    #: is computed once per region (tile) and batch size and kept here, up to ``embedding_cache_bytes`` in all (the
    #: pipeline's exact speed-up; regions beyond the budget are recomputed per call, so memory stays flat in the image
    #: size); None: computed in every call.
    embedding_cache: dict | None = None
    region: tuple[int, int, int, int] | None = None
    embedding_cache_bytes: int = 64 << 20

    def crop(self, top: int, left: int, height: int, width: int, scale: int) -> SeeSRCondition:
        """The condition for a latent tile: the matching ``scale``x crop of the control image, global tokens."""
        image = self.control_image[:, :, top * scale : (top + height) * scale, left * scale : (left + width) * scale]
        return SeeSRCondition(
            self.prompt_embeds,
            image,
            self.image_embeds,
            self.embedding_cache,
            (top, left, height, width),
            self.embedding_cache_bytes,
        )

    def repeat_interleave(self, repeats: int) -> SeeSRCondition:
        """Each image's condition ``repeats`` times in a row (each half of a guidance batch's text likewise)."""
        image_embeds = self.image_embeds
        return SeeSRCondition(
            self.prompt_embeds.repeat_interleave(repeats, dim=0),
            self.control_image.repeat_interleave(repeats, dim=0),
            image_embeds.repeat_interleave(repeats, dim=0) if image_embeds is not None else None,
        )


def predict_noise(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    cond: SeeSRCondition,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """The UNet's prediction (epsilon or v, as the scheduler is configured) with the ControlNet residuals added.

    ``cond.control_image`` / ``cond.image_embeds`` may have a batch that divides the latents' (e.g. one copy for both
    classifier-free-guidance halves); they are repeated here, per call (per tile), not kept doubled at full size.
    """
    control_image, image_embeds = cond.control_image, cond.image_embeds
    if control_image.shape[0] != latents.shape[0]:
        control_image = control_image.repeat(latents.shape[0] // control_image.shape[0], 1, 1, 1)
    if image_embeds is not None and image_embeds.shape[0] != latents.shape[0]:
        image_embeds = image_embeds.repeat(latents.shape[0] // image_embeds.shape[0], 1, 1)
    control_image = unit_float(control_image, latents.dtype)  # uint8: value / 255, per call (per tile)
    extra = {}
    if cond.embedding_cache is not None:
        key = (cond.region, tuple(control_image.shape), latents.dtype)
        embeds = cond.embedding_cache.get(key)
        if embeds is None:
            embeds = controlnet.embed_condition(control_image)
            used = sum(e.numel() * e.element_size() for e in cond.embedding_cache.values())
            if used + embeds.numel() * embeds.element_size() <= cond.embedding_cache_bytes:
                cond.embedding_cache[key] = embeds
        extra["controlnet_cond_embeds"] = embeds
    shared = {
        "encoder_hidden_states": cond.prompt_embeds,
        "image_encoder_hidden_states": image_embeds,
        "return_dict": False,
    }
    down, mid = controlnet(
        latents, timestep, controlnet_cond=control_image, conditioning_scale=conditioning_scale, **shared, **extra
    )
    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return unet(latents, timestep, **residuals, **shared)[0]
