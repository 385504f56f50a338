"""Train a one-step (OSEDiff) model: `accelerate launch train_osediff.py --config configs/osediff.yaml [key=value]`.

The generator is Stable Diffusion 2 with OSEDiff's peft LoRA (`seesr.models.onestep`: three UNet adapters, one on the
VAE encoder, ``conv_in`` trained in full): LQ latent (a posterior sample) -> UNet at t=999 -> x0 -> decode, clamped
to [-1, 1]. Its loss is ``lambda_l2 * MSE + lambda_lpips * LPIPS-VGG`` on the decoded image plus ``lambda_vsd`` times
the variational score distillation (VSD) term in latent space: a frozen "real score" UNet (Stable Diffusion, or the
toolkit's SeeSR UNet + ControlNet as teacher) with classifier-free guidance against a LoRA-tuned "fake score" UNet,
which is trained in its own phase of every step to denoise the generator's latents (``lambda_vsd_lora``). Data:
HR crops degraded online (Real-ESRGAN, OSEDiff's variant: no USM, LQ resized back to the crop size, 8-bit); prompts
are DAPE tags of the LQ (the original uses RAM tags of the GT). The end of training writes ``osediff.pkl`` (the
released layout) and an `OSEDiffPipeline` folder. See docs/training_osediff.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from seesr.data.degradation import DegradationConfig, degrade
from seesr.training.config import load_config
from seesr.training.loop import DataConfig, TrainingArgs, ValidationArgs

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

TRAINED_FILE = "{name}.safetensors"  # the trainable tensors of each trained module inside a checkpoint folder


# ---------------------------------------------------------------------------------------------------- config


def osediff_degradation() -> DegradationConfig:
    """Real-ESRGAN x4plus as OSEDiff uses it: no USM on the GT, LQ resized back to the crop size, 8-bit quantised."""
    return DegradationConfig(usm_sharpen_gt=False, resize_lq_to_gt=True, quantize_lq=True)


@dataclass
class OSEDiffLossConfig:
    """The original's loss weights (1, 2, 1, 1), CFG 7.5 and VSD timestep range [20, 980)."""

    lambda_l2: float = 1.0
    lambda_lpips: float = 2.0
    lambda_vsd: float = 1.0
    lambda_vsd_lora: float = 1.0
    cfg_vsd: float = 7.5
    vsd_timesteps: tuple[int, int] = (20, 980)
    lpips_weights: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("lambda_l2", "lambda_lpips", "lambda_vsd", "lambda_vsd_lora", "cfg_vsd"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name}: expected a float >= 0, got {getattr(self, name)!r}")
        low, high = self.vsd_timesteps
        if not 0 <= low < high <= 1000:
            raise ValueError(f"loss.vsd_timesteps: expected [low, high) with 0 <= low < high <= 1000, got "
                             f"{list(self.vsd_timesteps)}")  # fmt: skip
        if self.lambda_lpips > 0 and not self.lpips_weights:
            raise ValueError(
                f"loss.lambda_lpips={self.lambda_lpips} needs loss.lpips_weights (LPIPS-VGG weight files, see "
                "docs/training_osediff.md); set loss.lambda_lpips=0 to train without LPIPS"
            )


@dataclass
class OSEDiffTrainConfig:
    """The one-step training config (configs/osediff.yaml); see docs/training_osediff.md for every key."""

    pretrained_model: str = ""
    dape_model: str | None = None
    teacher: Literal["sd", "seesr"] = "sd"
    teacher_model: str | None = None
    lora_rank: int = 4
    neg_prompt: str = ""
    null_text_ratio: float = 0.0
    data: DataConfig = field(default_factory=lambda: DataConfig(train_data="data/train"))
    degradation: DegradationConfig = field(default_factory=osediff_degradation)
    loss: OSEDiffLossConfig = field(default_factory=OSEDiffLossConfig)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    train: TrainingArgs = field(default_factory=TrainingArgs)
    export_dir: str | None = None
    export_pkl: bool = True
    timestep: int = 999

    def __post_init__(self) -> None:
        if not self.pretrained_model:
            raise ValueError("pretrained_model: expected a Stable Diffusion 2 folder (diffusers layout) or hub id")
        if self.teacher == "seesr" and not self.teacher_model:
            raise ValueError("teacher=seesr needs teacher_model (a SeeSR pipeline folder, e.g. from seesr convert)")
        if self.teacher == "sd" and self.teacher_model:
            raise ValueError("teacher_model: only used with teacher=seesr (teacher=sd uses pretrained_model's UNet)")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank: expected an int >= 1, got {self.lora_rank!r}")
        if not 0 <= self.timestep < 1000:
            raise ValueError(f"timestep: expected an int in [0, 1000), got {self.timestep!r}")
        if self.export_pkl and self.timestep != 999:
            raise ValueError(f"timestep={self.timestep} needs export_pkl=false: the released osediff.pkl layout has "
                             "no timestep (the original always runs t=999); the pipeline folder keeps it")  # fmt: skip
        if not 0 <= self.null_text_ratio <= 1:
            raise ValueError(f"null_text_ratio: expected a float in [0, 1], got {self.null_text_ratio!r}")
        if not self.degradation.resize_lq_to_gt:
            raise ValueError("degradation.resize_lq_to_gt must be true: the generator takes the LQ at the crop size")
        if self.data.resolution % self.degradation.scale:
            raise ValueError(f"data.resolution={self.data.resolution} must be divisible by degradation.scale="
                             f"{self.degradation.scale}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- models


class OneStepGenerator(nn.Module):
    """OSEDiff's generator: ``lq`` in [-1, 1] -> (image in [-1, 1], x0 latents). ``unet`` / ``vae`` carry the LoRA."""

    def __init__(self, unet: nn.Module, vae: nn.Module, alphas_cumprod: torch.Tensor, timestep: int = 999):
        super().__init__()
        self.unet, self.vae, self.timestep = unet, vae, timestep
        # a plain attribute, not a buffer: `.to(dtype=fp16)` must not round the alpha-bar (float32, as the original)
        self.alphas_cumprod = alphas_cumprod.float().clone()

    def forward(self, lq: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator | None = None):
        from seesr.models.onestep import onestep_x0

        scaling = self.vae.config.scaling_factor
        posterior = self.vae.encode(lq.to(self.vae.dtype)).latent_dist
        lq_latents = posterior.sample(generator=generator) * scaling
        noise_pred = self.unet(lq_latents, self.timestep, encoder_hidden_states=prompt_embeds).sample
        latents = onestep_x0(lq_latents, noise_pred, self.alphas_cumprod, self.timestep)
        image = self.vae.decode((latents / scaling).to(self.vae.dtype)).sample.clamp(-1, 1)
        return image, latents


class FakeScore(nn.Module):
    """The LoRA-tuned score of the generator's latent distribution (``unet_update`` in the original)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor):
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds).sample


@dataclass
class RealScore:
    """The frozen teacher: an SD UNet, or SeeSR's UNet + ControlNet conditioned on the LQ and its DAPE tokens."""

    unet: nn.Module
    controlnet: nn.Module | None = None
    dape: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, noisy_latents, timesteps, embeds, lq01: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Noise prediction for a [negative; positive] batch of ``embeds`` (latents are doubled here)."""
        latents = torch.cat([noisy_latents] * 2).to(dtype)
        timesteps = torch.cat([timesteps] * 2)
        if self.controlnet is None:
            return self.unet(latents, timesteps, encoder_hidden_states=embeds.to(dtype)).sample
        from seesr.denoise import SeeSRCondition, predict_noise

        image_embeds = None
        if self.dape is not None:
            image_embeds = self.dape(self.dape.preprocess(lq01), output_logits=False).image_embeds
        cond = SeeSRCondition(embeds.to(dtype), lq01.to(dtype), image_embeds)
        return predict_noise(self.unet, self.controlnet, latents, timesteps, cond)


@dataclass
class OSEDiffParts:
    """Everything `setup_training` builds."""

    tokenizer: Any
    text_encoder: Any
    scheduler: Any
    generator: OneStepGenerator
    fake_score: FakeScore | None
    real_score: RealScore | None
    dape: Any | None
    lpips: Any | None


def _freeze(*modules) -> None:
    for module in modules:
        if module is not None:
            module.requires_grad_(False).eval()


def load_real_score(cfg: OSEDiffTrainConfig) -> RealScore:
    if cfg.teacher == "sd":
        from diffusers import UNet2DConditionModel

        return RealScore(UNet2DConditionModel.from_pretrained(cfg.pretrained_model, subfolder="unet"))
    from seesr.models.controlnet import SeeSRControlNetModel
    from seesr.models.unet import SeeSRUNet2DConditionModel

    unet = SeeSRUNet2DConditionModel.from_pretrained(cfg.teacher_model, subfolder="unet")
    controlnet = SeeSRControlNetModel.from_pretrained(cfg.teacher_model, subfolder="controlnet")
    dape = None
    if (Path(cfg.teacher_model) / "prompt_extractor").is_dir():
        from dape import DAPEModel

        dape = DAPEModel.from_pretrained(cfg.teacher_model, subfolder="prompt_extractor")
    return RealScore(unet, controlnet, dape)


def setup_training(cfg: OSEDiffTrainConfig, device: torch.device | str, weight_dtype: torch.dtype) -> OSEDiffParts:
    """Load every model, add the LoRA, freeze what is frozen and place it on ``device``: frozen weights in
    ``weight_dtype``, trainable ones (LoRA, the generator's ``conv_in``) in float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from seesr.models.onestep import add_unet_lora, add_vae_lora, as_onestep_model, trainable_parameter_names
    from seesr.training.loop import cast_training_params

    source = cfg.pretrained_model
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"pretrained_model: scheduler prediction_type={scheduler.config.prediction_type!r}; "
                         "one-step training needs an epsilon-prediction model (SD 2.1-base)")  # fmt: skip
    unet = as_onestep_model(UNet2DConditionModel.from_pretrained(source, subfolder="unet"))
    vae = as_onestep_model(AutoencoderKL.from_pretrained(source, subfolder="vae"))
    _freeze(unet, vae)
    add_unet_lora(unet, cfg.lora_rank)
    add_vae_lora(vae, cfg.lora_rank)
    for model in (unet, vae):
        names = set(trainable_parameter_names(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
    generator = OneStepGenerator(unet, vae, scheduler.alphas_cumprod, cfg.timestep)
    fake_score = real_score = None
    if cfg.loss.lambda_vsd > 0:
        fake_unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        _freeze(fake_unet)
        add_unet_lora(fake_unet, cfg.lora_rank)
        for name, param in fake_unet.named_parameters():
            param.requires_grad_("lora" in name)
        fake_score = FakeScore(fake_unet)
        real_score = load_real_score(cfg)
        _freeze(real_score.unet, real_score.controlnet, real_score.dape)
    dape = None
    if cfg.dape_model is not None:
        from dape import DAPEModel

        dape = DAPEModel.from_pretrained(cfg.dape_model)
    elif real_score is not None and real_score.dape is not None:
        dape = real_score.dape
    lpips = None
    if cfg.loss.lambda_lpips > 0:
        from seesr.models.lpips import load_lpips

        lpips = load_lpips(*cfg.loss.lpips_weights)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    _freeze(text_encoder, dape)
    frozen = [text_encoder, dape, generator, fake_score]
    if real_score is not None:
        frozen += [real_score.unet, real_score.controlnet]
    for module in frozen:
        if module is not None:
            module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    if lpips is not None:
        lpips.to(device)
    cast_training_params([m for m in (generator, fake_score) if m is not None], torch.float32)
    if cfg.train.gradient_checkpointing:
        for module in (unet, fake_score.unet if fake_score else None, real_score.unet if real_score else None):
            if module is not None:
                module.enable_gradient_checkpointing()
    generator.train()
    if fake_score is not None:
        fake_score.train()
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    return OSEDiffParts(tokenizer, text_encoder, scheduler, generator, fake_score, real_score, dape, lpips)


# ---------------------------------------------------------------------------------------------------- losses


def eps_to_x0(alphas_cumprod: torch.Tensor, noise_pred: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor):
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), per sample, in ``sample``'s dtype (as the original)."""
    alpha_prod = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[timesteps].view(-1, 1, 1, 1)
    return (sample - (1 - alpha_prod) ** 0.5 * noise_pred.to(sample.dtype)) / alpha_prod**0.5


def vsd_loss(latents: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """The VSD surrogate: its gradient w.r.t. ``latents`` is ``2 (x0_fake - x0_real) / (w numel)`` with
    ``w = mean |latents - x0_real|`` per sample, so a descent step moves the latents towards the real score's x0."""
    weight = (latents - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (x0_fake - x0_real) / weight
    return F.mse_loss(latents.float(), (latents - grad).detach().float())


def distribution_matching_loss(parts: OSEDiffParts, fake_score, latents, embeds, neg_embeds, lq01, cfg, generator):
    """``lambda_vsd``-free VSD term: noise the generator's latents at t ~ U[vsd_timesteps), compare the fake score's
    x0 with the real score's CFG x0 (``cfg_vsd``, negative = ``neg_prompt``)."""
    low, high = cfg.loss.vsd_timesteps
    timesteps = torch.randint(low, high, (len(latents),), generator=generator, device=generator.device)
    timesteps = timesteps.to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    scheduler = parts.scheduler
    noisy = scheduler.add_noise(latents.detach(), noise, timesteps)
    with torch.no_grad():
        x0_fake = eps_to_x0(scheduler.alphas_cumprod, fake_score(noisy, timesteps, embeds), noisy, timesteps)
        dtype = parts.real_score.unet.dtype
        uncond, text = parts.real_score(noisy, timesteps, torch.cat([neg_embeds, embeds]), lq01, dtype).chunk(2)
        guided = uncond.float() + cfg.loss.cfg_vsd * (text.float() - uncond.float())
        x0_real = eps_to_x0(scheduler.alphas_cumprod, guided, noisy, timesteps)
    return vsd_loss(latents, x0_fake, x0_real)


def fake_score_loss(parts: OSEDiffParts, fake_score, latents, embeds, generator) -> torch.Tensor:
    """The fake score's own loss: denoise the (detached) generator latents at t ~ U[0, T) (epsilon MSE)."""
    latents = latents.detach()
    steps = parts.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (len(latents),), generator=generator, device=generator.device)
    timesteps = timesteps.to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    noisy = parts.scheduler.add_noise(latents, noise, timesteps)
    return F.mse_loss(fake_score(noisy, timesteps, embeds.detach()).float(), noise.float())


@torch.no_grad()
def prepare_batch(parts: OSEDiffParts, batch: dict[str, Any], cfg: OSEDiffTrainConfig, generator) -> dict[str, Any]:
    """Degrade the HR crops, make the prompts as OSEDiffPipeline does (``"{tags}, ,"`` from DAPE tags of the LQ, else
    tag files; ``","`` without tags or when ``null_text_ratio`` drops them) and embed them. Returns gt / lq in
    [-1, 1], lq01 in [0, 1], embeds, neg_embeds."""
    from seesr.conditioning import compose_prompt, encode_prompt

    gt = batch["gt"]
    out = degrade(gt, cfg.degradation, generator)
    lq01 = out.lq
    tags = list(batch["tags"])
    if parts.dape is not None:
        logits = parts.dape(parts.dape.preprocess(lq01.to(parts.dape.dtype))).logits
        tags = parts.dape.tags(logits=logits)
    drop = torch.rand(len(tags), generator=generator, device=generator.device).tolist()
    # no tags (none available, or dropped): "," = what OSEDiffPipeline feeds for no tags and an empty prompt
    prompts = [compose_prompt(None if d < cfg.null_text_ratio or t is None else t, "", "") for d, t in zip(drop, tags)]
    embeds = encode_prompt(parts.tokenizer, parts.text_encoder, prompts, gt.device).float()
    neg_embeds = encode_prompt(parts.tokenizer, parts.text_encoder, [cfg.neg_prompt] * len(gt), gt.device).float()
    return {"gt": out.gt * 2 - 1, "lq": lq01 * 2 - 1, "lq01": lq01, "embeds": embeds, "neg_embeds": neg_embeds,
            "prompts": prompts}  # fmt: skip


def generator_loss(parts: OSEDiffParts, generator_model, fake_score, inputs, cfg, generator) -> dict[str, Any]:
    """The generator's loss terms (weighted) and their sum ``loss``; ``latents`` is the generator's x0."""
    image, latents = generator_model(inputs["lq"], inputs["embeds"], generator)
    terms = {"loss_l2": F.mse_loss(image.float(), inputs["gt"].float()) * cfg.loss.lambda_l2}
    loss = terms["loss_l2"]
    if parts.lpips is not None:
        terms["loss_lpips"] = parts.lpips(image.float(), inputs["gt"].float()).mean() * cfg.loss.lambda_lpips
        loss = loss + terms["loss_lpips"]
    if fake_score is not None:
        vsd = distribution_matching_loss(parts, fake_score, latents, inputs["embeds"], inputs["neg_embeds"],
                                         inputs["lq01"], cfg, generator)  # fmt: skip
        terms["loss_vsd"] = vsd * cfg.loss.lambda_vsd
        loss = loss + terms["loss_vsd"]
    return {**terms, "loss": loss, "latents": latents.detach()}


# ---------------------------------------------------------------------------------------------------- checkpoints


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model`` (LoRA, ``conv_in``) as contiguous CPU float32 copies."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``'s trainable parameters; every one must be there, nothing else."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: missing {missing[:4]} / unexpected {unexpected[:4]} trainable tensors")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def register_trainable_hooks(accelerator: Accelerator, models: dict[str, nn.Module]) -> None:
    """Checkpoints store only the trainable tensors of each named model (``<name>.safetensors``): the frozen SD
    weights are never copied into ``checkpoint-N`` (a few MB instead of GBs); resume loads them strictly."""
    from safetensors.torch import load_file, save_file

    from seesr.training.loop import unwrap

    def name_of(model: nn.Module) -> str | None:
        plain = unwrap(accelerator, model)
        return next((name for name, target in models.items() if target is plain), None)

    def save_hook(prepared: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        aligned = len(weights) == len(prepared)
        for i in reversed(range(len(prepared))):
            name = name_of(prepared[i])
            if name is None:
                continue
            if accelerator.is_main_process:
                state = trainable_state(unwrap(accelerator, prepared[i]))
                save_file(state, str(Path(output_dir) / TRAINED_FILE.format(name=name)))
            if aligned:
                weights.pop(i)

    def load_hook(prepared: list[nn.Module], input_dir: str) -> None:
        for i in reversed(range(len(prepared))):
            name = name_of(prepared[i])
            if name is None:
                continue
            path = Path(input_dir) / TRAINED_FILE.format(name=name)
            if not path.is_file():
                raise FileNotFoundError(f"{input_dir}: checkpoint has no {path.name}")
            load_trainable_state(unwrap(accelerator, prepared.pop(i)), load_file(str(path)), str(path))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------- export


def build_pipeline(parts: OSEDiffParts, unet, vae):
    """The real OSEDiffPipeline over these modules."""
    from diffusers import DDPMScheduler

    from pipelines import OSEDiffPipeline

    return OSEDiffPipeline(
        vae=vae,
        unet=unet,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        scheduler=DDPMScheduler.from_config(parts.scheduler.config),
        prompt_extractor=parts.dape,
        timestep=parts.generator.timestep,
    )


def export_models(cfg: OSEDiffTrainConfig, parts: OSEDiffParts, generator_model: OneStepGenerator) -> Path:
    """Write ``export_dir`` (default ``output_dir``) ``/osediff.pkl`` (the released dict layout, float32) and
    ``/pipeline``: an OSEDiffPipeline folder built as `seesr convert --osediff osediff.pkl --sd pretrained_model`
    builds one (fresh float32 SD parts with the checkpoint loaded; byte-identical files, tested), plus the DAPE model
    as ``prompt_extractor`` when there is one. The folder is staged and renamed into place."""
    import copy
    import shutil
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from pipelines import OSEDiffPipeline
    from seesr.image_io import atomic_save_file
    from seesr.models.onestep import load_osediff_checkpoint, osediff_checkpoint

    export_dir = Path(cfg.export_dir or cfg.train.output_dir)
    checkpoint = osediff_checkpoint(generator_model.unet, generator_model.vae)
    checkpoint.state_dict_unet = {k: v.float() for k, v in checkpoint.state_dict_unet.items()}
    checkpoint.state_dict_vae = {k: v.float() for k, v in checkpoint.state_dict_vae.items()}
    if cfg.export_pkl:
        atomic_save_file(lambda tmp: torch.save(checkpoint.to_dict(), tmp), export_dir / "osediff.pkl")
    source = cfg.pretrained_model
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    load_osediff_checkpoint(checkpoint, unet, vae)
    pipe = OSEDiffPipeline(
        vae,
        CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
        unet,
        DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        prompt_extractor=copy.deepcopy(parts.dape).float() if parts.dape is not None else None,
        timestep=cfg.timestep,
    )
    pipeline_dir = export_dir / "pipeline"
    pipeline_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pipeline.", dir=export_dir))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if pipeline_dir.exists():
            shutil.rmtree(pipeline_dir)
        staging.rename(pipeline_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported the one-step model to %s (pipeline/%s)", export_dir, ", osediff.pkl" * cfg.export_pkl)
    return pipeline_dir


# ---------------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def log_validation(accelerator: Accelerator, cfg: OSEDiffTrainConfig, parts: OSEDiffParts, generator_model, step):
    """Super-resolve ``validation.images`` with the real OSEDiffPipeline over the modules being trained."""
    from seesr.image_io import load_image
    from seesr.training.loop import save_validation_images, unwrap

    model = unwrap(accelerator, generator_model)
    model.eval()
    pipe = build_pipeline(parts, model.unet, model.vae)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for path in cfg.validation.images:
        generator = torch.Generator(device=accelerator.device).manual_seed(cfg.validation.seed)
        with accelerator.autocast():
            image = pipe(image=load_image(path).rgb, upscale=cfg.degradation.scale, generator=generator,
                         output_type="pil").images[0]  # fmt: skip
        results.append(image)
    save_validation_images(accelerator, results, cfg.validation.images, cfg.train.output_dir, step)
    model.train()
    return results


# ---------------------------------------------------------------------------------------------------- training


def train_osediff(cfg: OSEDiffTrainConfig) -> Path:
    """Train (or resume) a one-step model as configured with `run_training`; returns the exported pipeline folder.

    The generator is the job's own optimizer group; the fake score (with VSD on) is a second `LossPhase` stepped
    right after it on every micro-batch, on the generator's detached latents (as the original alternates them)."""
    from seesr.data.image_folder import ImageFolderDataset, collate
    from seesr.training.loop import (
        LossPhase,
        TrainingJob,
        frozen_weight_dtype,
        run_training,
        shuffled_loader,
        start_training,
        trainable_parameters,
    )

    args = cfg.train
    accelerator = start_training(cfg, "osediff")
    parts = setup_training(cfg, accelerator.device, frozen_weight_dtype(accelerator))
    trained = {"generator": parts.generator, **({"fake_score": parts.fake_score} if parts.fake_score else {})}
    params = {name: trainable_parameters(model) for name, model in trained.items()}
    dataset = ImageFolderDataset(
        cfg.data.train_data, cfg.data.resolution, cfg.data.random_flip, cfg.data.tags_dir, seed=args.seed or 0
    )

    def generator_phase(models, batch, generator):
        inputs = prepare_batch(parts, batch, cfg, generator)
        terms = generator_loss(parts, models["generator"], models.get("fake_score"), inputs, cfg, generator)
        return {**terms, "embeds": inputs["embeds"]}

    def fake_score_phase(models, batch, generator, terms):
        loss = fake_score_loss(parts, models["fake_score"], terms["latents"], terms["embeds"], generator)
        return {"loss_d": loss * cfg.loss.lambda_vsd_lora}

    phases = [LossPhase(params["fake_score"], fake_score_phase, "loss_d")] if parts.fake_score else []
    job = TrainingJob(
        models=trained,
        params=params["generator"],
        loader=shuffled_loader(dataset, args, collate),
        loss=generator_phase,
        export=lambda models: export_models(cfg, parts, models["generator"]),
        export_dir=Path(cfg.export_dir or args.output_dir) / "pipeline",
        validate=lambda models, step: log_validation(accelerator, cfg, parts, models["generator"], step),
        validation_steps=cfg.validation.steps if cfg.validation.images else 0,
        checkpoint_hooks=lambda accelerator: register_trainable_hooks(accelerator, trained),
        description="OSEDiff: {:.2f} M trainable generator parameters (fake score {:.2f} M)".format(
            *(sum(p.numel() for p in params.get(name, [])) / 1e6 for name in ("generator", "fake_score"))
        ),
        phases=phases,
    )
    return run_training(accelerator, args, job)


def main(argv: list[str] | None = None) -> None:
    from seesr.training.config import parse_cli

    config, overrides = parse_cli("Train a one-step (OSEDiff) model with LoRA, LPIPS and VSD.", argv)
    train_osediff(load_config(OSEDiffTrainConfig, config, overrides))


if __name__ == "__main__":
    main()
