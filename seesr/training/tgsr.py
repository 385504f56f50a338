"""Train a TGSR model: `accelerate launch train_tgsr.py --config configs/tgsr.yaml [key=value ...]`.

Loss = content_weight * content(sample, gt) + coarse_weight * content(coarse_sample, gt)
     + detail_weight * (1 - cos(CLIP image embedding of sample, CLIP text embedding of the caption)).
The text encoder is frozen; its features are computed once per distinct caption and cached.
At the end the trained model is exported as a `TGSRPipeline` folder (`export_dir`, default `output_dir/pipeline`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from seesr.models.tgsr import (
    DEFAULT_TEXT_ENCODER,
    PACKAGE_PREFIX,
    TextFeatures,
    TGSRModel,
    encode_text,
    load_text_encoder,
)
from seesr.training.config import config_from_cli, load_config
from seesr.training.loop import TrainingArgs, TrainingJob, run_training, shuffled_loader, start_training

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_ARGS = set(inspect.signature(TGSRModel.__init__).parameters) - {"self", "text_dim"}


@dataclass
class TGSRDataConfig:
    train_data: str = ""
    resolution: int = 96
    upscale_factors: list[int] = field(default_factory=lambda: [4])
    degradation: Literal["bicubic", "realesrgan"] = "bicubic"
    degradation_config: str | None = None
    caption_dropout: float = 0.1
    random_flip: bool = True
    repeats: int = 1
    cache_images: bool = False

    def __post_init__(self) -> None:
        if not self.train_data:
            raise ValueError("data.train_data: expected a folder (name.png + name.txt) or a .jsonl file, got ''")
        for factor in self.upscale_factors:
            if factor < 2 or factor & (factor - 1) or self.resolution % factor:
                raise ValueError(f"data.upscale_factors: {factor!r} must be a power of two dividing resolution="
                                 f"{self.resolution}")  # fmt: skip
        if not self.upscale_factors:
            raise ValueError("data.upscale_factors: expected at least one factor")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"data.caption_dropout: got {self.caption_dropout!r}, expected a float in [0, 1]")
        if self.degradation_config is not None and self.degradation != "realesrgan":
            raise ValueError("data.degradation_config: only used with degradation=realesrgan")


@dataclass
class TGSRLossConfig:
    content_loss: Literal["l1", "mse"] = "l1"
    content_weight: float = 1.0
    coarse_weight: float = 0.5
    detail_weight: float = 0.0
    clip_model: str | None = None

    def __post_init__(self) -> None:
        if min(self.content_weight, self.coarse_weight, self.detail_weight) < 0:
            raise ValueError("loss: content_weight, coarse_weight and detail_weight must be >= 0")
        if self.detail_weight > 0 and not self.clip_model:
            raise ValueError(
                f"loss.detail_weight={self.detail_weight} needs loss.clip_model (a CLIP folder or hub id)"
            )


@dataclass
class TGSRTrainConfig:
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_text_length: int = 64
    pretrained_model: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: TGSRDataConfig = field(default_factory=lambda: TGSRDataConfig(train_data="data/tgsr/train"))
    loss: TGSRLossConfig = field(default_factory=TGSRLossConfig)
    train: TrainingArgs = field(default_factory=TrainingArgs)
    export_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.model) - MODEL_ARGS)
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; expected TGSRModel arguments {sorted(MODEL_ARGS)}")
        if self.pretrained_model is not None and self.model:
            raise ValueError("model: set either pretrained_model or model settings, not both")
        factors = self.model.get("upscale_factors")
        if factors is not None and set(self.data.upscale_factors) - set(factors):
            raise ValueError(
                f"data.upscale_factors {self.data.upscale_factors} not all in model.upscale_factors {factors}"
            )


class TextFeatureCache:
    """Frozen text features (`encode_text`) per distinct caption, computed once; batches are padded to their longest
    caption."""

    def __init__(self, text_encoder: nn.Module, tokenizer, max_length: int):
        self.text_encoder, self.tokenizer, self.max_length = text_encoder, tokenizer, max_length
        self.cache: dict[str, TextFeatures] = {}

    def __call__(self, captions: list[str], device: torch.device) -> TextFeatures:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            with torch.autocast(torch.device(device).type, enabled=False):  # as the pipeline: no mixed precision
                features = encode_text(self.text_encoder, self.tokenizer, new, self.max_length)
            for i, caption in enumerate(new):
                self.cache[caption] = features.item(i).to("cpu")
        return TextFeatures.stack([self.cache[c] for c in captions]).to(device)


class CLIPDetailLoss(nn.Module):
    """1 - cosine similarity between CLIP's embedding of an image (`[0, 1]` pixels) and of its caption."""

    def __init__(self, clip_model: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.clip = CLIPModel.from_pretrained(clip_model).requires_grad_(False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(clip_model)
        self.image_size = self.clip.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD)[:, None, None], persistent=False)
        self.text_cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text_embeds(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.text_cache})
        if new:
            tokens = self.tokenizer(new, padding=True, truncation=True, return_tensors="pt").to(self.mean.device)
            with torch.no_grad():
                features = self._features(self.clip.get_text_features(**tokens))
            self.text_cache.update(zip(new, F.normalize(features.float(), dim=-1)))
        return torch.stack([self.text_cache[c] for c in captions])

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        pixels = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                               align_corners=False, antialias=True)  # fmt: skip
        pixels = (pixels.clamp(0, 1) - self.mean) / self.std
        image_embeds = F.normalize(self._features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return (1 - (image_embeds * self.text_embeds(captions)).sum(-1)).mean()


def degradation_config(cfg: TGSRDataConfig):
    """The Real-ESRGAN degradation settings of ``cfg`` (read from ``degradation_config`` once), or None (bicubic)."""
    if cfg.degradation == "bicubic":
        return None
    from seesr.data.degradation import DegradationConfig

    return load_config(DegradationConfig, cfg.degradation_config) if cfg.degradation_config else DegradationConfig()


def make_lq(gt: torch.Tensor, factor: int, cfg: TGSRDataConfig, generator: torch.Generator, degradation=None):
    """(lq, gt) for one batch: bicubic through 8-bit PIL, or the Real-ESRGAN degradation (``degradation``: the
    settings from `degradation_config`, read here when not given)."""
    from seesr.data.captioned import bicubic_downscale

    if cfg.degradation == "bicubic":
        return bicubic_downscale(gt, factor), gt
    from seesr.data.degradation import degrade

    base = degradation if degradation is not None else degradation_config(cfg)
    out = degrade(gt, _with_scale(base, factor), generator)
    lq = out.lq
    size = (gt.shape[-2] // factor, gt.shape[-1] // factor)
    if tuple(lq.shape[-2:]) != size:
        lq = F.interpolate(lq, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return lq, out.gt


def _with_scale(cfg: Any, factor: int) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, scale=factor) if dataclasses.is_dataclass(cfg) else cfg


def content_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prediction = prediction.float()
    return F.l1_loss(prediction, target) if kind == "l1" else F.mse_loss(prediction, target)


def compute_loss(
    model, batch: dict, text: TextFeatures, factor: int, cfg: TGSRTrainConfig, clip_loss, generator, degradation=None
) -> dict:
    """One training loss on a batch `{"gt", "caption"}`; returns a dict of named terms with "loss" the total."""
    lq, gt = make_lq(batch["gt"], factor, cfg.data, generator, degradation)
    output = model(lq, **text.model_kwargs(), upscale=factor)
    terms = {"content": content_loss(cfg.loss.content_loss, output.sample, gt)}
    total = cfg.loss.content_weight * terms["content"]
    if cfg.loss.coarse_weight > 0:
        terms["coarse"] = content_loss(cfg.loss.content_loss, output.coarse_sample, gt)
        total = total + cfg.loss.coarse_weight * terms["coarse"]
    captioned = [i for i, c in enumerate(batch["caption"]) if c]
    if clip_loss is not None and captioned:
        terms["detail"] = clip_loss(output.sample[captioned], [batch["caption"][i] for i in captioned])
        total = total + cfg.loss.detail_weight * terms["detail"]
    terms["loss"] = total
    return terms


def build_model(cfg: TGSRTrainConfig, text_dim: int) -> TGSRModel:
    if cfg.pretrained_model is not None:
        model = TGSRModel.from_pretrained(cfg.pretrained_model)
        if model.config.text_dim != text_dim:
            raise ValueError(f"pretrained_model text_dim={model.config.text_dim} != the text encoder's {text_dim}")
    else:
        model = TGSRModel(
            text_dim=text_dim, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
        )
    for factor in cfg.data.upscale_factors:
        model.check_upscale(factor)
    return model


def export_pipeline(model: TGSRModel, text_encoder, tokenizer, cfg: TGSRTrainConfig) -> Path:
    from pipelines.pipeline_tgsr import TGSRPipeline

    export_dir = Path(cfg.export_dir or Path(cfg.train.output_dir) / "pipeline")
    source = cfg.text_encoder if cfg.text_encoder.startswith(PACKAGE_PREFIX) else None
    TGSRPipeline(
        model=model, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_source=source
    ).save_pretrained(export_dir)
    logger.info("exported the TGSR pipeline to %s", export_dir)
    return export_dir


def train_tgsr(cfg: TGSRTrainConfig) -> Path:
    """Train (or resume) a TGSR model as configured; returns the exported pipeline folder."""
    from seesr.data.captioned import CaptionedImageDataset, collate_captioned
    from seesr.training.loop import trainable_parameters

    args, data = cfg.train, cfg.data
    accelerator = start_training(cfg, "tgsr")
    text_encoder, tokenizer = load_text_encoder(cfg.text_encoder)
    text_encoder.to(accelerator.device)
    model = build_model(cfg, text_encoder.config.hidden_size)
    model.train()
    clip_loss = CLIPDetailLoss(cfg.loss.clip_model).to(accelerator.device) if cfg.loss.detail_weight > 0 else None
    degradation = degradation_config(data)  # read once, not per step
    dataset = CaptionedImageDataset(
        data.train_data, data.resolution, data.random_flip, data.repeats, data.cache_images
    )
    loader = shuffled_loader(dataset, args, collate_captioned)
    text_cache = TextFeatureCache(text_encoder, tokenizer, cfg.max_text_length)
    params = trainable_parameters(model)

    def loss(models, batch, generator):
        drop = torch.rand(len(batch["caption"]), generator=generator, device=generator.device).tolist()
        captions = ["" if d < data.caption_dropout else c for d, c in zip(drop, batch["caption"], strict=True)]
        draw = torch.randint(len(data.upscale_factors), (), generator=generator, device=generator.device)
        factor = data.upscale_factors[int(draw)]
        text = text_cache(captions, accelerator.device)
        batch = {"gt": batch["gt"], "caption": captions}
        return compute_loss(models["model"], batch, text, factor, cfg, clip_loss, generator, degradation)

    job = TrainingJob(
        models={"model": model},
        params=params,
        loader=loader,
        loss=loss,
        export=lambda models: export_pipeline(models["model"], text_encoder, tokenizer, cfg),
        export_dir=Path(cfg.export_dir or Path(args.output_dir) / "pipeline"),
        description=f"TGSR: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters",
    )
    return run_training(accelerator, args, job)


def main(argv: list[str] | None = None) -> None:
    train_tgsr(config_from_cli(TGSRTrainConfig, "Train a TGSR (text-guided super-resolution) model.", argv))
