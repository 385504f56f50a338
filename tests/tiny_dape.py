"""A seeded tiny DAPE that honours the full model's contract (config, DAPEOutput, tags, LoRA, save/load).

32 px input, Swin embed 8 with depths (2, 2), heads (1, 2), window 2 (so both stages have shifted windows), 16-wide
tokens: ``image_embeds`` is (B, 17, 16).
"""

from __future__ import annotations

import torch

TINY_DAPE_CONFIG = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 8,
    "depths": (2, 2),
    "num_heads": (1, 2),
    "window_size": 2,
    "projection_dim": 16,
    "tagging_hidden_size": 16,
    "tagging_num_layers": 2,
    "tagging_num_heads": 2,
    "tagging_intermediate_size": 32,
}

TINY_TAGS = (
    "animal",
    "building",
    "cat",
    "dog",
    "grass",
    "person",
    "sky",
    "street",
    "tree",
    "water",
    "white",
    "yellow",
)


def tiny_tag_names(num_classes: int) -> list[str]:
    return [TINY_TAGS[i] if i < len(TINY_TAGS) else f"tag {i}" for i in range(num_classes)]


def tiny_thresholds(num_classes: int) -> list[float]:
    """Per-class thresholds that differ between classes (0.45 ... 0.95), like RAM's."""
    return [0.45 + 0.05 * (i % 11) for i in range(num_classes)]


def tiny_dape(seed: int = 0, num_classes: int = 12, **overrides):
    """A `DAPEModel` with seeded random weights, in eval mode (the global RNG state is left untouched)."""
    from dape import DAPEModel

    config = {**TINY_DAPE_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DAPEModel(tag_names=tiny_tag_names(num_classes), tag_thresholds=tiny_thresholds(num_classes), **config)
        with torch.no_grad():  # spread the logits across the thresholds, so that the tiny model does tag
            model.tagging_head.label_embed.normal_(0.0, 1.0)
            model.tagging_head.fc.weight.normal_(0.0, 1.0)
            model.image_proj.weight.normal_(0.0, 1.0)
    return model.eval()


def tiny_pixel_values(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)
