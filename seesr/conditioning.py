"""The SeeSR condition, built the same way by the pipeline and by training: `build_condition`.

LQ images (and their bicubic upscale, the ControlNet's input) + the user's prompt or the training tags -> DAPE tags
and representation tokens, the composed prompts, CLIP text embeddings -> the `SeeSRCondition` the denoiser takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seesr.denoise import SeeSRCondition


def compose_prompt(tags: str | None, prompt: str, added_prompt: str) -> str:
    """The original's prompt: ``f"{tags}, {prompt},"`` + ``added_prompt`` (no tags: ``f"{prompt},"`` + added)."""
    return (f"{prompt}," if tags is None else f"{tags}, {prompt},") + added_prompt


@torch.no_grad()
def encode_prompt(
    tokenizer, text_encoder, prompts: Sequence[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """CLIP token embeddings (B, max_length, D) of ``prompts`` (padded to the tokenizer's max length, as SD)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = device if device is not None else text_encoder.device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(device) if use_mask else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


@torch.no_grad()
def dape_condition(
    prompt_extractor, images, with_tags: bool = True, resize: str | None = None
) -> tuple[list[str] | None, torch.Tensor]:
    """DAPE on LQ images (PIL, or [0, 1] tensors): (tag strings or None, representation tokens (B, N, D)).

    ``resize``: the interpolation of DAPE's resize of tensors (None: DAPE's default)."""
    if resize is None:
        pixel_values = prompt_extractor.preprocess(images)
    else:
        pixel_values = prompt_extractor.preprocess(images, mode=resize)
    output = prompt_extractor(pixel_values, output_logits=with_tags)
    tags = prompt_extractor.tags(logits=output.logits) if with_tags else None
    return tags, output.image_embeds


@torch.no_grad()
def build_condition(
    control_image: torch.Tensor,
    prompts: Sequence[str],
    tokenizer,
    text_encoder,
    dape=None,
    dape_images=None,
    dape_resize: str | None = None,
    added_prompt: str | None = None,
    negative_prompts: Sequence[str] | None = None,
    image_embeds: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[SeeSRCondition, list[str]]:
    """The `SeeSRCondition` the denoiser takes, and the prompts it encodes: one function for pipeline and training.

    Args:
        control_image: (B, 3, H, W) in [0, 1], the bicubic-upscaled LQ (the ControlNet's input), on the device; or
            uint8 (value / 255), kept as it is: the denoiser converts it per call (per tile).
        prompts: one text per image: the user's prompt (pipeline) or the training tags (after null-text dropout).
        tokenizer, text_encoder: CLIP, as in Stable Diffusion.
        dape: the DAPE model, or None (then no tags and no representation tokens unless ``image_embeds``).
        dape_images: what DAPE sees: PIL images or [0, 1] tensors (default ``control_image``).
        dape_resize: the interpolation of DAPE's resize of tensors (default DAPE's own; training: "bicubic").
        added_prompt: when given, each prompt becomes ``compose_prompt(DAPE's tags, prompt, added_prompt)`` (the
            pipeline); when None the prompts are encoded as they are (training) and DAPE gives only its tokens.
        negative_prompts: classifier-free guidance: the text embeddings are ``[negatives; prompts]``, while the
            control image and the tokens stay single (`predict_noise` repeats them per call).
        image_embeds: representation tokens (1 or B, N, D) to use instead of DAPE's.
        dtype: the dtype of the condition's tensors (default: as computed).
    """
    device = control_image.device
    tags = None
    with_tags = added_prompt is not None
    if dape is not None and (image_embeds is None or with_tags):
        source = control_image if dape_images is None else dape_images
        tags, dape_embeds = dape_condition(dape, source, with_tags=with_tags, resize=dape_resize)
        image_embeds = dape_embeds if image_embeds is None else image_embeds.to(device).expand(len(prompts), -1, -1)
    elif image_embeds is not None:
        image_embeds = image_embeds.to(device).expand(len(prompts), -1, -1)
    texts = list(prompts)
    if with_tags:
        tags_or_none = tags if tags is not None else [None] * len(texts)
        texts = [compose_prompt(t, p, added_prompt) for t, p in zip(tags_or_none, texts, strict=True)]
    embeds = encode_prompt(tokenizer, text_encoder, [*negative_prompts, *texts] if negative_prompts else texts, device)
    if dtype is not None:
        embeds = embeds.to(dtype=dtype)
        if control_image.is_floating_point():  # a uint8 control image stays uint8 (read as value / 255 per tile)
            control_image = control_image.to(dtype)
        image_embeds = image_embeds.to(device, dtype) if image_embeds is not None else None
    return SeeSRCondition(embeds, control_image, image_embeds), texts
