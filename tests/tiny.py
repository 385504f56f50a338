"""Seeded tiny builders shared by the tests (CPU, well under a second each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
RELEASED = FIXTURES / "released_layout"


def released_config(model: str) -> dict:
    """The config.json field set the original SeeSR code writes, at tiny size (``unet`` or ``controlnet``)."""
    return json.loads((RELEASED / f"{model}_config.json").read_text())


def released_keys(model: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key and shape of the original's tiny ``unet`` or ``controlnet``."""
    keys = {}
    for line in (RELEASED / "tiny_keys.tsv").read_text().splitlines()[1:]:
        owner, key, shape = line.split("\t")
        if owner == model:
            keys[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def tiny_unet_config(image_cross_attention_dim: int = 512) -> dict:
    config = {k: v for k, v in released_config("unet").items() if not k.startswith("_")}
    config["image_cross_attention_dim"] = image_cross_attention_dim
    return config


def tiny_unet(seed: int = 0, image_cross_attention_dim: int = 512, use_image_cross_attention: bool = True):
    from seesr import SeeSRUNet2DConditionModel

    torch.manual_seed(seed)
    config = tiny_unet_config(image_cross_attention_dim)
    config["use_image_cross_attention"] = use_image_cross_attention
    return SeeSRUNet2DConditionModel.from_config(config).eval()


def tiny_controlnet(unet, seed: int = 1, randomize_zero_convs: bool = True):
    """A ControlNet from ``unet``; its zero-initialised output convs get random values so that tests see them."""
    from seesr import SeeSRControlNetModel

    controlnet = SeeSRControlNetModel.from_unet(unet).eval()
    if randomize_zero_convs:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in controlnet.named_parameters():
                if name.startswith(
                    ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
                ):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return controlnet


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (so zero-initialised layers contribute)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * scale)
    return model


def unet_inputs(batch: int = 2, size: int = 16, seed: int = 0, tokens: int = 145, image_dim: int = 512):
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
        "image_encoder_hidden_states": torch.randn(batch, tokens, image_dim, generator=generator),
    }
