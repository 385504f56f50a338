"""Seeded tiny builders shared by the tests (CPU, well under a second each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.pipeline_seesr import SD2_SCHEDULER_CONFIG

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


def write_released_folder(folder: Path, model: str, drop: str | None = None, fmt: str = "safetensors") -> dict:
    """A SeeSR ``unet`` / ``controlnet`` folder as the original writes it (random weights); returns the weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(released_config(model), indent=2))
    generator = torch.Generator().manual_seed(7)
    state = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in released_keys(model).items()}
    if drop:
        del state[drop]
    if fmt == "safetensors":
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return state


def write_sd2_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 2 folder in diffusers layout (vae, text_encoder, tokenizer, scheduler, unet)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    tiny_vae(seed).save_pretrained(folder / "vae")
    tiny_text_encoder(seed).save_pretrained(folder / "text_encoder")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    PNDMScheduler.from_config({**SD2_SCHEDULER, "skip_prk_steps": True}).save_pretrained(folder / "scheduler")
    config = {k: v for k, v in tiny_unet_config().items() if "image_" not in k}
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


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


TOKENIZER_DIR = FIXTURES / "tiny_clip_tokenizer"


def tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=max_length
    )
    assert len(tokenizer("clean, the dog").input_ids) > 2, "the tiny tokenizer must really tokenize"
    return tokenizer


def tiny_text_encoder(seed: int = 0, max_length: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=524,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_length,
        bos_token_id=522,
        eos_token_id=523,
        pad_token_id=523,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0, levels: int = 4, sample_size: int = 64, attention: bool = True):
    """A tiny VAE of 8-channel blocks, scale factor ``2 ** (levels - 1)``; ``attention``: its mid-block attention."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=sample_size,
        mid_block_add_attention=attention,
    ).eval()


SD2_SCHEDULER = SD2_SCHEDULER_CONFIG


def tiny_pipeline(seed: int = 0, prompt_extractor=None, image_cross_attention_dim: int | None = None):
    """A seeded tiny SeeSRPipeline (random weights everywhere; zero-initialised ControlNet outputs randomised)."""
    from diffusers import DDPMScheduler

    from pipelines import SeeSRPipeline

    if image_cross_attention_dim is None:
        image_cross_attention_dim = prompt_extractor.config.projection_dim if prompt_extractor is not None else 512
    unet = tiny_unet(seed, image_cross_attention_dim=image_cross_attention_dim)
    return SeeSRPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        controlnet=tiny_controlnet(unet, seed + 1),
        scheduler=DDPMScheduler.from_config(SD2_SCHEDULER),
        prompt_extractor=prompt_extractor,
    )


def lq_image(width: int = 16, height: int = 16, seed: int = 0):
    """A smooth random RGB PIL image."""
    import numpy as np
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(3, max(height // 4, 1), max(width // 4, 1), generator=generator)
    image = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
