"""Train SeeSR: `accelerate launch train_controlnet.py --config configs/controlnet.yaml [key=value ...]`.

The ControlNet (with RCA) and the UNet modules named by ``trainable_modules`` (default: the UNet's RCA,
``image_attentions``) learn to predict the noise (or v) of Stable Diffusion 2 latents of HR crops, conditioned on
the bicubic-upscaled degraded crop (ControlNet input, [0, 1]), the tag prompt (CLIP, dropped to ``""`` with
probability ``null_text_ratio``) and DAPE's representation tokens of that LQ image (RCA, never dropped).
The VAE, the text encoder, DAPE and the rest of the UNet are frozen. Every step degrades the batch on the training
device with `seesr.data.degradation.degrade`. Validation images come from the real `SeeSRPipeline`; the end of training
exports a complete pipeline folder (``output_dir/pipeline``, plus ``unet/`` and ``controlnet/``).
See docs/training_seesr.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from seesr.conditioning import build_condition
from seesr.data.degradation import DegradationConfig, degraded_condition
from seesr.denoise import predict_noise
from seesr.models.rca import RCA_MODULE_NAME
from seesr.training.config import config_from_cli
from seesr.training.loop import (
    DataConfig,
    TrainingArgs,
    TrainingJob,
    ValidationArgs,
    run_training,
    shuffled_loader,
    start_training,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class ValidationConfig(ValidationArgs):
    """`ValidationArgs` (images, steps, seed) plus the SeeSRPipeline's sampling settings for them."""

    num_inference_steps: int = 50
    guidance_scale: float = 5.5
    process_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_inference_steps < 1:
            raise ValueError(f"validation.num_inference_steps: expected an int >= 1, got {self.num_inference_steps!r}")
        if self.process_size < 8:
            raise ValueError(f"validation.process_size: expected an int >= 8, got {self.process_size!r}")


@dataclass
class SeeSRTrainConfig:
    """The SeeSR training config (configs/controlnet.yaml); see docs/training_seesr.md for every key."""

    pretrained_model: str = ""
    unet_model: str | None = None
    controlnet_model: str | None = None
    dape_model: str | None = None
    trainable_modules: list[str] = field(default_factory=lambda: [RCA_MODULE_NAME])
    null_text_ratio: float = 0.5
    zero_init_rca: bool = False
    data: DataConfig = field(default_factory=lambda: DataConfig(train_data="data/train"))
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainingArgs = field(default_factory=TrainingArgs)
    export_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.pretrained_model:
            raise ValueError("pretrained_model: expected a Stable Diffusion 2 folder (diffusers layout) or hub id")
        if not 0 <= self.null_text_ratio <= 1:
            raise ValueError(f"null_text_ratio: expected a float in [0, 1], got {self.null_text_ratio!r}")
        if any(not m or not isinstance(m, str) for m in self.trainable_modules):
            raise ValueError(
                f"trainable_modules: expected non-empty module-name suffixes, got {self.trainable_modules}"
            )
        rca = [m for m in self.trainable_modules if RCA_MODULE_NAME in m.split(".")]
        if self.dape_model is None and rca:
            raise ValueError(
                f"trainable_modules={self.trainable_modules}: without dape_model RCA gets no DAPE tokens, so "
                f"{rca} would get no gradient; set dape_model or remove them from trainable_modules"
            )
        if self.data.resolution % self.degradation.scale:
            raise ValueError(
                f"data.resolution={self.data.resolution} must be divisible by degradation.scale="
                f"{self.degradation.scale}"
            )


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class FrozenParts:
    """The frozen components of a SeeSR stack (DAPE optional)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    dape: Any | None


def load_frozen_parts(cfg: SeeSRTrainConfig) -> FrozenParts:
    """VAE, CLIP text encoder + tokenizer and scheduler from ``pretrained_model``; DAPE from ``dape_model``."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    source = cfg.pretrained_model
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.data.resolution % scale:
        raise ValueError(f"data.resolution={cfg.data.resolution} must be divisible by the VAE's factor {scale}")
    dape = None
    if cfg.dape_model is not None:
        from dape import DAPEModel

        dape = DAPEModel.from_pretrained(cfg.dape_model)
    parts = FrozenParts(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        dape=dape,
    )
    for module in (parts.vae, parts.text_encoder, parts.dape):
        if module is not None:
            module.requires_grad_(False).eval()
    return parts


def image_cross_attention_dim(parts: FrozenParts) -> int:
    """Width of the RCA tokens: DAPE's projection dim (512 for the released DAPE; 512 without DAPE)."""
    return 512 if parts.dape is None else int(parts.dape.config.projection_dim)


def load_unet(cfg: SeeSRTrainConfig, token_dim: int):
    """The SeeSR UNet: a SeeSR ``unet_model`` folder, or ``pretrained_model``'s SD UNet with new RCA modules."""
    from seesr.models.unet import SeeSRUNet2DConditionModel

    if cfg.unet_model is not None:
        unet = SeeSRUNet2DConditionModel.from_pretrained(cfg.unet_model)
    else:
        unet = SeeSRUNet2DConditionModel.from_sd_unet(
            cfg.pretrained_model, image_cross_attention_dim=token_dim, zero_init_rca=cfg.zero_init_rca
        )
    if unet.config.use_image_cross_attention and unet.config.image_cross_attention_dim != token_dim:
        raise ValueError(
            f"unet_model={cfg.unet_model!r}: image_cross_attention_dim={unet.config.image_cross_attention_dim} "
            f"but dape_model's tokens are {token_dim}-d"
        )
    return unet


def load_controlnet(cfg: SeeSRTrainConfig, unet):
    """A SeeSR ControlNet folder (``controlnet_model``) or a copy of the UNet's encoder (RCA included)."""
    from seesr.models.controlnet import SeeSRControlNetModel

    if cfg.controlnet_model is not None:
        return SeeSRControlNetModel.from_pretrained(cfg.controlnet_model)
    return SeeSRControlNetModel.from_unet(unet)


def matching_modules(model: torch.nn.Module, suffixes: list[str]) -> dict[str, torch.nn.Module]:
    """Modules whose (dotted) name ends with one of ``suffixes``; an unmatched suffix is an error."""
    found = {n: m for n, m in model.named_modules() if n and any(n == s or n.endswith("." + s) for s in suffixes)}
    for suffix in suffixes:
        if not any(n == suffix or n.endswith("." + suffix) for n in found):
            raise ValueError(f"trainable_modules: {suffix!r} matches no module of {type(model).__name__}")
    return found


def mark_trainable(unet, controlnet, cfg: SeeSRTrainConfig, with_tokens: bool) -> None:
    """Freeze the UNet except ``trainable_modules``; train the ControlNet (minus its RCA when there are no tokens)."""
    unet.requires_grad_(False)
    for module in matching_modules(unet, cfg.trainable_modules).values():
        module.requires_grad_(True)
    controlnet.requires_grad_(True)
    if not with_tokens:  # RCA is skipped without DAPE tokens: its weights would never get a gradient
        for name, module in controlnet.named_modules():
            if name.endswith(RCA_MODULE_NAME):
                module.requires_grad_(False)


def full_precision_names(unet, cfg: SeeSRTrainConfig) -> set[str]:
    """UNet parameters kept in float32 under mixed precision: trainable ones and the RCA weights (which may be new
    and are copied into the export, see `export_models`)."""
    return {
        name for name, param in unet.named_parameters() if param.requires_grad or f".{RCA_MODULE_NAME}." in f".{name}"
    }


# ---------------------------------------------------------------------------------------------------- step


@torch.no_grad()
def batch_prompts(
    parts: FrozenParts, tags: list[str | None], gt: torch.Tensor, null_text_ratio: float, generator: torch.Generator
) -> list[str]:
    """Training prompts: the pre-extracted tags, else DAPE's tags of the GT (else ""), each dropped to ""
    with probability ``null_text_ratio``."""
    tags = list(tags)
    untagged = [i for i, t in enumerate(tags) if t is None]
    if untagged and parts.dape is not None:
        logits = parts.dape(parts.dape.preprocess(gt[untagged])).logits
        for i, text in zip(untagged, parts.dape.tags(logits=logits), strict=True):
            tags[i] = text
    drop = torch.rand(len(tags), generator=generator, device=generator.device).tolist()
    return ["" if d < null_text_ratio or t is None else t for d, t in zip(drop, tags, strict=True)]


def training_loss(
    parts: FrozenParts,
    unet: torch.nn.Module,
    controlnet: torch.nn.Module,
    batch: dict[str, Any],
    cfg: SeeSRTrainConfig,
    generator: torch.Generator,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The SeeSR loss of one batch ``{"gt": (B, 3, H, W) in [0, 1] on the device, "tags": [str | None]}``: MSE in
    float32 between the denoiser's prediction and the scheduler's target (epsilon or v)."""
    gt = batch["gt"]
    device = gt.device
    with torch.no_grad():
        # 1. degrade on the device; the bicubic-upscaled LQ is the ControlNet condition and DAPE's input
        target_image, control_image = degraded_condition(gt, cfg.degradation, generator)
        # 2. the condition, built as the pipeline builds it: the prompts are the tags (pre-extracted, else DAPE's of
        # the GT) after null-text dropout; DAPE's tokens come from the upscaled LQ resized bicubically (as SeeSR's
        # training: F.interpolate to DAPE's size, clamped, normalised)
        prompts = batch_prompts(parts, batch["tags"], target_image, cfg.null_text_ratio, generator)
        cond, _ = build_condition(
            control_image, prompts, parts.tokenizer, parts.text_encoder, dape=parts.dape, dape_resize="bicubic"
        )
        cond = dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds.to(weight_dtype))  # tokens keep theirs
        # 3. latents, noise, timesteps
        posterior = parts.vae.encode(target_image.to(weight_dtype) * 2 - 1).latent_dist
        latents = posterior.sample(generator=generator).float() * parts.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device)
        steps = parts.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator, device=device)
        noisy_latents = parts.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = parts.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = parts.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"scheduler prediction_type={prediction_type!r}: expected epsilon or v_prediction")
    # 4. ControlNet then UNet, through the function the pipeline uses
    prediction = predict_noise(unet, controlnet, noisy_latents.to(weight_dtype), timesteps, cond)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


# ---------------------------------------------------------------------------------------------------- loop helpers


# ---------------------------------------------------------------------------------------------------- validation


def build_pipeline(parts: FrozenParts, unet, controlnet):
    """The real SeeSRPipeline over these modules (DDPM sampling, as SeeSR)."""
    from diffusers import DDPMScheduler

    from pipelines import SeeSRPipeline

    return SeeSRPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=DDPMScheduler.from_config(parts.scheduler.config),
        prompt_extractor=parts.dape,
    )


@torch.no_grad()
def log_validation(accelerator: Accelerator, cfg: SeeSRTrainConfig, parts: FrozenParts, models, step: int) -> list:
    """Super-resolve ``validation.images`` with the modules being trained; save PNGs, log them to TensorBoard."""
    from seesr.image_io import load_image
    from seesr.training.loop import save_validation_images, unwrap

    unet, controlnet = (unwrap(accelerator, m) for m in models)
    was_training = controlnet.training
    unet.eval()
    controlnet.eval()
    pipe = build_pipeline(parts, unet, controlnet)
    pipe.set_progress_bar_config(disable=True)
    val = cfg.validation
    results = []
    for path in val.images:
        generator = torch.Generator(device=accelerator.device).manual_seed(val.seed)
        with accelerator.autocast():
            image = pipe(
                image=[load_image(path).rgb],
                upscale=cfg.degradation.scale,
                process_size=val.process_size,
                num_inference_steps=val.num_inference_steps,
                guidance_scale=val.guidance_scale,
                generator=generator,
                output_type="pil",
            ).images[0]
        results.append(image)
    save_validation_images(accelerator, results, val.images, cfg.train.output_dir, step)
    if was_training:
        unet.train()
        controlnet.train()
    return results


# ---------------------------------------------------------------------------------------------------- export


def export_models(cfg: SeeSRTrainConfig, unet, controlnet) -> Path:
    """Write ``export_dir`` (default ``output_dir``) ``/pipeline`` (a complete SeeSRPipeline folder), ``/unet`` and
    ``/controlnet`` in float32. The frozen parts are reloaded from their sources in float32 (training may hold them
    in fp16/bf16); the UNet gets the trained and RCA weights copied in."""
    export_dir = Path(cfg.export_dir or cfg.train.output_dir)
    parts = load_frozen_parts(cfg)
    final_unet = load_unet(cfg, image_cross_attention_dim(parts))
    keep = full_precision_names(unet, cfg)
    trained = dict(unet.named_parameters())
    with torch.no_grad():
        for name, param in final_unet.named_parameters():
            if name in keep:
                param.copy_(trained[name].float())
    controlnet = controlnet.float()
    from seesr.staging import write_folder  # each folder staged and swapped in whole, as `seesr convert` does

    write_folder(export_dir / "unet", final_unet.save_pretrained)
    write_folder(export_dir / "controlnet", controlnet.save_pretrained)
    write_folder(export_dir / "pipeline", build_pipeline(parts, final_unet, controlnet).save_pretrained)
    logger.info("exported SeeSR to %s (pipeline/, unet/, controlnet/)", export_dir)
    return export_dir / "pipeline"


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class TrainingSetup:
    """What `setup_training` builds: the frozen parts and the trainable UNet and ControlNet (on the device)."""

    parts: FrozenParts
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    weight_dtype: torch.dtype
    unet_trains: bool


def setup_training(cfg: SeeSRTrainConfig, device: torch.device | str, weight_dtype: torch.dtype) -> TrainingSetup:
    """Load every model, freeze what is frozen, place it on ``device``: frozen weights in ``weight_dtype``,
    trainable weights (and the UNet's RCA) in float32."""
    from seesr.training.loop import cast_training_params

    parts = load_frozen_parts(cfg)
    unet = load_unet(cfg, image_cross_attention_dim(parts))
    controlnet = load_controlnet(cfg, unet)
    mark_trainable(unet, controlnet, cfg, with_tokens=parts.dape is not None)
    keep = full_precision_names(unet, cfg)
    for module in (unet, parts.vae, parts.text_encoder, parts.dape):
        if module is not None:
            module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    for name, param in unet.named_parameters():
        if name in keep:
            param.data = param.data.float()
    controlnet.to(device)
    cast_training_params([unet, controlnet], torch.float32)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    unet.train()
    controlnet.train()
    unet_trains = any(p.requires_grad for p in unet.parameters())
    return TrainingSetup(parts, unet, controlnet, weight_dtype, unet_trains)


def train_controlnet(cfg: SeeSRTrainConfig) -> Path:
    """Train (or resume) SeeSR as configured; returns the exported pipeline folder."""
    from seesr.data.image_folder import ImageFolderDataset, collate
    from seesr.training.loop import count_parameters, frozen_weight_dtype, trainable_parameters

    args = cfg.train
    accelerator = start_training(cfg, "seesr-controlnet")
    weight_dtype = frozen_weight_dtype(accelerator)
    setup = setup_training(cfg, accelerator.device, weight_dtype)
    parts, frozen_unet = setup.parts, setup.unet
    dataset = ImageFolderDataset(
        cfg.data.train_data, cfg.data.resolution, cfg.data.random_flip, cfg.data.tags_dir, seed=args.seed or 0
    )
    untagged = sum(dataset.tag_file(path) is None for path in dataset.files)
    if untagged:
        how = "tagged on the fly by DAPE (from the GT)" if parts.dape is not None else "trained with an empty prompt"
        logger.warning("%d of %d training images have no tag file: they are %s", untagged, len(dataset), how)
    loader = shuffled_loader(dataset, args, collate)
    params = trainable_parameters(setup.controlnet) + trainable_parameters(setup.unet)

    def loss(models, batch, generator):
        unet = models.get("unet", frozen_unet)
        return {"loss": training_loss(parts, unet, models["controlnet"], batch, cfg, generator, weight_dtype)}

    def validate(models, step):
        log_validation(accelerator, cfg, parts, (models.get("unet", frozen_unet), models["controlnet"]), step)

    job = TrainingJob(
        models={"controlnet": setup.controlnet, **({"unet": setup.unet} if setup.unet_trains else {})},
        params=params,
        loader=loader,
        loss=loss,
        export=lambda models: export_models(cfg, models.get("unet", frozen_unet), models["controlnet"]),
        export_dir=Path(cfg.export_dir or args.output_dir) / "pipeline",
        validate=validate if cfg.validation.images else None,
        validation_steps=cfg.validation.steps,
        description=f"SeeSR: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters (ControlNet "
        f"{count_parameters(setup.controlnet, True) / 1e6:.2f} M, UNet {count_parameters(setup.unet, True) / 1e6:.2f}"
        " M)",
    )
    return run_training(accelerator, args, job)


def main(argv: list[str] | None = None) -> None:
    description = "Train SeeSR (ControlNet + RCA) on HR images with on-the-fly degradation."
    train_controlnet(config_from_cli(SeeSRTrainConfig, description, argv))
