"""Conditioning shared by SeeSR training and the pipeline: DAPE tags and tokens, prompts, CLIP text embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
def dape_condition(prompt_extractor, images, with_tags: bool = True) -> tuple[list[str] | None, torch.Tensor]:
    """DAPE on LQ images (PIL, or [0, 1] tensors): (tag strings or None, representation tokens (B, N, D))."""
    pixel_values = prompt_extractor.preprocess(images)
    output = prompt_extractor(pixel_values, output_logits=with_tags)
    tags = prompt_extractor.tags(logits=output.logits) if with_tags else None
    return tags, output.image_embeds
