"""Train a TGSR model: `accelerate launch train_tgsr.py --config configs/tgsr.yaml [key=value ...]`.

Loss = content_weight * content(sample, gt) + coarse_weight * content(coarse_sample, gt)
     + detail_weight * (1 - cos(CLIP image embedding of sample, CLIP text embedding of the caption)).
The text encoder is frozen; its features are computed once per distinct caption and cached.
At the end the trained model is exported as a `TGSRPipeline` folder (`export_dir`, default `output_dir/pipeline`).
"""

from __future__ import annotations

import argparse
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from seesr.models.tgsr import DEFAULT_TEXT_ENCODER, PACKAGE_PREFIX, TGSRModel, encode_text, load_text_encoder
from seesr.training.config import config_to_dict, load_config
from seesr.training.loop import TrainingArgs

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
    """Frozen text features per distinct caption, computed once; batches are padded to their longest caption."""

    def __init__(self, text_encoder: nn.Module, tokenizer, max_length: int):
        self.text_encoder, self.tokenizer, self.max_length = text_encoder, tokenizer, max_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            tokens, mask, pooled = encode_text(self.text_encoder, self.tokenizer, new, self.max_length)
            for i, caption in enumerate(new):
                self.cache[caption] = (tokens[i, : int(mask[i].sum())].cpu(), pooled[i].cpu())
        longest = max(self.cache[c][0].shape[0] for c in captions)
        token_embeds = torch.zeros(len(captions), longest, self.cache[captions[0]][0].shape[-1])
        token_mask = torch.zeros(len(captions), longest, dtype=torch.bool)
        for i, caption in enumerate(captions):
            length = self.cache[caption][0].shape[0]
            token_embeds[i, :length], token_mask[i, :length] = self.cache[caption][0], True
        pooled = torch.stack([self.cache[c][1] for c in captions])
        return token_embeds.to(device), token_mask.to(device), pooled.to(device)


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


def make_lq(gt: torch.Tensor, factor: int, cfg: TGSRDataConfig, generator: torch.Generator):
    """(lq, gt) for one batch: bicubic through 8-bit PIL, or the Real-ESRGAN degradation (lazy import)."""
    from seesr.data.captioned import bicubic_downscale

    if cfg.degradation == "bicubic":
        return bicubic_downscale(gt, factor), gt
    from seesr.data.degradation import DegradationConfig, degrade

    base = load_config(DegradationConfig, cfg.degradation_config) if cfg.degradation_config else DegradationConfig()
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


def compute_loss(model, batch: dict, text: tuple, factor: int, cfg: TGSRTrainConfig, clip_loss, generator) -> dict:
    """One training loss on a batch `{"gt", "caption"}`; returns a dict of named terms with "loss" the total."""
    lq, gt = make_lq(batch["gt"], factor, cfg.data, generator)
    output = model(lq, text[0], text[2], text[1], upscale=factor)
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
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from seesr.data.captioned import CaptionedImageDataset, collate_captioned
    from seesr.training.loop import (
        apply_gradients,
        epoch_batches,
        finish_step,
        make_accelerator,
        make_lr_scheduler,
        make_optimizer,
        register_save_load_hooks,
        resume_step,
        trainable_parameters,
        unwrap,
        write_resolved_config,
    )

    args = cfg.train
    # 1. accelerator, frozen text encoder, model, optional CLIP
    accelerator = make_accelerator(args, "tgsr", config=config_to_dict(cfg))
    write_resolved_config(cfg, args.output_dir, accelerator)
    text_encoder, tokenizer = load_text_encoder(cfg.text_encoder)
    text_encoder.to(accelerator.device)
    model = build_model(cfg, text_encoder.config.hidden_size)
    model.train()
    clip_loss = CLIPDetailLoss(cfg.loss.clip_model).to(accelerator.device) if cfg.loss.detail_weight > 0 else None
    register_save_load_hooks(accelerator, {"model": model})
    # 2. data, optimizer, schedule
    data = cfg.data
    dataset = CaptionedImageDataset(
        data.train_data, data.resolution, data.random_flip, data.repeats, data.cache_images
    )
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate_captioned,
    )
    optimizer = make_optimizer(trainable_parameters(model), args)
    lr_scheduler = make_lr_scheduler(optimizer, args)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    step = resume_step(accelerator, args.output_dir, args.resume)
    text_cache = TextFeatureCache(text_encoder, tokenizer, cfg.max_text_length)
    generator = torch.Generator().manual_seed((args.seed or 0) * 1_000_003 + step + accelerator.process_index)
    logger.info("TGSR: %.2f M trainable parameters, %d images, starting at step %d",
                sum(p.numel() for p in trainable_parameters(model)) / 1e6, len(dataset.items), step)  # fmt: skip
    # 3. loop
    progress = tqdm(total=args.max_train_steps, initial=step, disable=not accelerator.is_local_main_process)
    batches = epoch_batches(accelerator, loader, step)  # resumes into the same shuffled order and position
    while step < args.max_train_steps:
        batch = next(batches)
        captions = [
            "" if float(torch.rand((), generator=generator)) < data.caption_dropout else c for c in batch["caption"]
        ]
        batch = {"gt": batch["gt"], "caption": captions}
        factor = data.upscale_factors[int(torch.randint(len(data.upscale_factors), (), generator=generator))]
        text = text_cache(captions, accelerator.device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                terms = compute_loss(model, batch, text, factor, cfg, clip_loss, generator)
            apply_gradients(
                accelerator, terms["loss"], model.parameters(), optimizer, lr_scheduler, args.max_grad_norm
            )
        if not accelerator.sync_gradients:
            continue
        step += 1
        finish_step(accelerator, args, step, terms, lr_scheduler, progress)
    progress.close()
    # 4. export
    accelerator.wait_for_everyone()
    export_dir = Path(cfg.export_dir or Path(args.output_dir) / "pipeline")
    if accelerator.is_main_process:
        export_dir = export_pipeline(unwrap(accelerator, model), text_encoder, tokenizer, cfg)
    accelerator.end_training()
    return export_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a TGSR (text-guided super-resolution) model.")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (configs/tgsr.yaml)")
    parser.add_argument("--output_dir", default=None, help="shortcut for train.output_dir=...")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint-N folder (train.resume)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_train_steps=100")
    parsed = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(parsed.overrides)
    if parsed.output_dir is not None:
        overrides.append(f"train.output_dir={parsed.output_dir}")
    if parsed.resume is not None:
        overrides.append(f"train.resume={parsed.resume}")
    train_tgsr(load_config(TGSRTrainConfig, parsed.config, overrides))


if __name__ == "__main__":
    main()
