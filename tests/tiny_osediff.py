"""Tiny OSEDiff in the released layout, and an independent re-statement of the original inference.

``write_osediff_pkl`` builds ``osediff.pkl`` the way ``OSEDiff_gen`` does (``initialize_unet`` / ``initialize_vae``
target lists, peft adapters, ``save_model``'s dict) on a tiny SD2 folder, with random LoRA and ``conv_in`` values.
``reference_osediff`` re-states ``test_osediff.py`` + ``OSEDiff_test`` with plain PIL / peft / diffusers calls (none
of the pipeline's code), in float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

UNET_GREP = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out"]
UNET_GREP += ["proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
VAE_GREP = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]


def original_unet_lists(unet) -> tuple[list[str], list[str], list[str]]:
    """``initialize_unet``'s three lists, re-stated."""
    encoder, decoder, others = [], [], []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in UNET_GREP:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                encoder.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                decoder.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                others.append(n.replace(".weight", ""))
                break
    return encoder, decoder, others


def original_vae_list(vae) -> list[str]:
    """``initialize_vae``'s list, re-stated (duplicates included): per weight, one entry per pattern that fits."""
    weights = [n for n, _ in vae.named_parameters() if "bias" not in n and "norm" not in n]
    quant = [n for n in weights if "quant_conv" in n and "post_quant_conv" not in n]
    return [
        n.replace(".weight", "")
        for n in weights
        for pattern in VAE_GREP
        if n in quant or (pattern in n and "encoder" in n)
    ]


def _original_adapters(unet, vae, rank: int, lists) -> None:
    from peft import LoraConfig

    for name, targets in zip(("default_encoder", "default_decoder", "default_others"), lists[:3], strict=True):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets), adapter_name=name)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists[3]), "default_encoder")


def write_osediff_pkl(path: Path, sd_folder: Path, seed: int = 3, rank: int = 4, scale: float = 0.2) -> dict:
    """``osediff.pkl`` as ``OSEDiff_gen.save_model`` writes it, for the SD folder's UNet / VAE; returns the dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    lists = [*original_unet_lists(unet), original_vae_list(vae)]
    _original_adapters(unet, vae, rank, lists)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae):
            for n, p in model.named_parameters():
                if "lora" in n or (model is unet and "conv_in" in n):
                    p.add_(torch.randn(p.shape, generator=generator) * scale)
    sd = {"vae_lora_encoder_modules": lists[3]}
    sd["unet_lora_encoder_modules"], sd["unet_lora_decoder_modules"], sd["unet_lora_others_modules"] = lists[:3]
    sd["rank_unet"] = rank
    sd["rank_vae"] = rank
    sd["state_dict_unet"] = {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k}
    sd["state_dict_vae"] = {k: v for k, v in vae.state_dict().items() if "lora" in k}
    torch.save(sd, path)
    return sd


def original_preprocess(image: PIL.Image.Image, upscale: int, process_size: int) -> PIL.Image.Image:
    """``test_osediff.py``'s resizing, verbatim in behaviour (PIL's default resample is bicubic)."""
    ori_width, ori_height = image.size
    if ori_width < process_size // upscale or ori_height < process_size // upscale:
        scale = (process_size // upscale) / min(ori_width, ori_height)
        image = image.resize((int(scale * ori_width), int(scale * ori_height)), PIL.Image.BICUBIC)
    image = image.resize((image.size[0] * upscale, image.size[1] * upscale), PIL.Image.BICUBIC)
    new_width, new_height = image.width - image.width % 8, image.height - image.height % 8
    return image.resize((new_width, new_height), PIL.Image.LANCZOS)


def _to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).byte()  # torchvision's ToPILImage on float tensors


def _adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    def calc_mean_std(feat, eps=1e-5):
        b, c = feat.shape[:2]
        var = feat.reshape(b, c, -1).var(dim=2) + eps
        return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)

    s_mean, s_std = calc_mean_std(source)
    c_mean, c_std = calc_mean_std(target)
    return (target - c_mean.expand(target.shape)) / c_std.expand(target.shape) * s_std.expand(
        target.shape
    ) + s_mean.expand(target.shape)


@torch.no_grad()
def reference_osediff(
    sd_folder: Path,
    pkl: Path,
    image: PIL.Image.Image,
    seed: int,
    prompt: str = "",
    dape=None,
    upscale: int = 4,
    process_size: int = 64,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """The original's outputs: ``{"prompt", "decoded" (1, 3, H, W) in [-1, 1], "nofix" / "adain" uint8 (H, W, 3)}``.

    The posterior sample (and the step's 1e-10 variance draw) come from the global RNG seeded with ``seed``
    right before ``vae.encode``, as ``torch.manual_seed(seed)`` would make the original deterministic.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(sd_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder")
    scheduler = DDPMScheduler.from_pretrained(sd_folder / "scheduler")
    scheduler.set_timesteps(timesteps=[999])  # = set_timesteps(1) on diffusers 0.25 (prev_t = -1)
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    model = torch.load(pkl, weights_only=True)
    # OSEDiff_test.load_ckpt
    for name, key in (("default_encoder", "encoder"), ("default_decoder", "decoder"), ("default_others", "others")):
        config = LoraConfig(
            r=model["rank_unet"], init_lora_weights="gaussian", target_modules=model[f"unet_lora_{key}_modules"]
        )
        unet.add_adapter(config, adapter_name=name)
    for n, p in unet.named_parameters():
        if "lora" in n or "conv_in" in n:
            p.data.copy_(model["state_dict_unet"][n])
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    config = LoraConfig(
        r=model["rank_vae"], init_lora_weights="gaussian", target_modules=model["vae_lora_encoder_modules"]
    )
    vae.add_adapter(config, adapter_name="default_encoder")
    for n, p in vae.named_parameters():
        if "lora" in n:
            p.data.copy_(model["state_dict_vae"][n])
    vae.set_adapter(["default_encoder"])
    unet.to(dtype=dtype), vae.to(dtype=dtype), text_encoder.to(dtype=dtype)

    # test_osediff.py
    input_image = original_preprocess(image.convert("RGB"), upscale, process_size)
    lq = _to_tensor(input_image)[None]
    tags = None
    if dape is not None:
        size = dape.config.image_size
        ram = torch.nn.functional.interpolate(lq, size=(size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        tags = dape.tags((ram - mean) / std)[0]
    validation_prompt = f"{tags}, {prompt}," if tags is not None else f"{prompt},"
    lq = lq * 2 - 1

    # OSEDiff_test.forward (untiled: the latent is below 96 x 96)
    ids = tokenizer(
        validation_prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    prompt_embeds = text_encoder(ids)[0]
    torch.manual_seed(seed)
    lq_latent = vae.encode(lq.to(dtype)).latent_dist.sample() * vae.config.scaling_factor
    timesteps = torch.tensor([999]).long()
    model_pred = unet(lq_latent, timesteps, encoder_hidden_states=prompt_embeds).sample
    x_denoised = scheduler.step(model_pred, timesteps, lq_latent, return_dict=True).prev_sample
    output_image = vae.decode(x_denoised.to(dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)

    nofix = _to_uint8(output_image[0] * 0.5 + 0.5)
    adain = _to_uint8(_adain(nofix.float().div(255)[None], _to_tensor(input_image)[None])[0].clamp_(0.0, 1.0))
    return {
        "prompt": validation_prompt,
        "decoded": output_image,
        "nofix": nofix.permute(1, 2, 0).numpy(),
        "adain": adain.permute(1, 2, 0).numpy(),
        "input_size": input_image.size,
    }
