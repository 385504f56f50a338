"""Train a TGSR model: `accelerate launch train_tgsr.py --config configs/tgsr.yaml [key=value ...]`.

Loss = content_weight * content(sample, gt) + coarse_weight * content(coarse_sample, gt)
     + detail_weight * (1 - cos(CLIP image embedding of sample, CLIP text embedding of the caption)).
The text encoder is frozen; its features are computed once per distinct caption and cached.
The loop is the shared `seesr.training.loop.run_training`: every draw of a step (caption dropout and augmentation,
the upscale factor, text noise, the degradation) comes from the step generator it passes to the loss.
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
    text_hidden_size,
)
from seesr.training.config import config_from_cli, load_config
from seesr.training.loop import TrainingArgs, TrainingJob, run_training, shuffled_loader, start_training

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_ARGS = set(inspect.signature(TGSRModel.__init__).parameters) - {"self", "text_dim"}


@dataclass
class TGSRSourceConfig:
    """One training source of a mix: its own repeats / flips / crop mode / caption dropout (null = the `data:`
    value). A caption dropout of 0 suits images whose detail only the caption can name (an empty caption must
    not be taught to draw some average of them)."""

    path: str = ""
    repeats: int | None = None
    random_flip: bool | None = None
    crop: Literal["random", "center", "resize"] | None = None
    caption_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.caption_dropout is not None and not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"data.train_data[].caption_dropout: got {self.caption_dropout!r}, expected [0, 1]")
        if not self.path:
            raise ValueError("data.train_data[].path: expected a folder (name.png + name.txt) or a .jsonl file")


@dataclass
class CaptionAugmentConfig:
    """Generic caption augmentation, drawn per caption and step (no word lists): `word_dropout` drops each word
    with this probability (never all), `shuffle` shuffles the word order with this probability, `template`
    wraps the caption in one of `templates` (`{}` = the caption) with this probability."""

    word_dropout: float = 0.2
    shuffle: float = 0.3
    template: float = 0.5
    templates: list[str] = field(
        default_factory=lambda: [
            "a photo of {}",
            "{}",
            "an image with {}",
            "close-up of {}",
            "{}, detailed",
            "a picture showing {}",
            "texture: {}",
        ]  # fmt: skip
    )

    def __post_init__(self) -> None:
        for name in ("word_dropout", "shuffle", "template"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"data.caption_augment.{name}: got {value!r}, expected a float in [0, 1]")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"data.caption_augment.templates: {bad} must each contain '{{}}' exactly once")


@dataclass
class TGSRDataConfig:
    train_data: str | list[TGSRSourceConfig] = ""
    resolution: int = 96
    upscale_factors: list[int] = field(default_factory=lambda: [4])
    degradation: Literal["bicubic", "realesrgan"] = "bicubic"
    degradation_config: str | None = None
    caption_dropout: float = 0.1
    random_flip: bool = True
    crop: Literal["random", "center", "resize"] = "random"
    repeats: int = 1
    cache_images: bool = False
    caption_augment: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)
    text_noise: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.text_noise:
            raise ValueError(f"data.text_noise: got {self.text_noise!r}, expected a float >= 0")
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
    agreement_weight: float = 0.0
    agreement_temperature: float = 0.1

    def __post_init__(self) -> None:
        if min(self.content_weight, self.coarse_weight, self.detail_weight, self.agreement_weight) < 0:
            raise ValueError("loss: content_weight, coarse_weight, detail_weight and agreement_weight must be >= 0")
        if self.agreement_temperature <= 0:
            raise ValueError(f"loss.agreement_temperature: got {self.agreement_temperature!r}, expected > 0")
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
        factors = self.model.get("upscale_factors")
        if factors is not None and set(self.data.upscale_factors) - set(factors):
            raise ValueError(
                f"data.upscale_factors {self.data.upscale_factors} not all in model.upscale_factors {factors}"
            )


class TextFeatureCache:
    """Frozen text features per distinct caption, computed once; batches are padded to their longest caption."""

    def __init__(self, text_encoder: nn.Module, tokenizer, max_length: int, max_entries: int = 20_000):
        self.text_encoder, self.tokenizer, self.max_length = text_encoder, tokenizer, max_length
        self.max_entries = max_entries  # augmented captions are many: keep the most recently used ones
        self.cache: dict[str, TextFeatures] = {}  # one caption each, trimmed to its real tokens, on the CPU

    def __call__(self, captions: list[str], device: torch.device) -> TextFeatures:
        for caption in sorted({c for c in captions if c not in self.cache}):
            # one caption per encoder call: its features do not depend on which captions are new together (a
            # resumed run, whose cache starts empty, gets bit-identical features)
            features = encode_text(self.text_encoder, self.tokenizer, [caption], self.max_length)
            self.cache[caption] = features.item(0).to("cpu")
        for caption in captions:  # most recently used last; drop the oldest beyond max_entries
            self.cache[caption] = self.cache.pop(caption)
        while len(self.cache) > max(self.max_entries, len(captions)):
            self.cache.pop(next(iter(self.cache)))
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


def augment_caption(caption: str, cfg: CaptionAugmentConfig, generator: torch.Generator) -> str:
    """Generic caption augmentation (word dropout, word shuffle, a template); empty captions stay empty."""
    words = caption.split()
    if not words:
        return caption
    device = generator.device  # the step generator lives on the training device
    draws = torch.rand(len(words) + 2, generator=generator, device=device).tolist()
    if cfg.word_dropout > 0 and len(words) > 1:
        kept = [w for w, u in zip(words, draws) if u >= cfg.word_dropout]
        words = kept or [words[int(torch.randint(len(words), (), generator=generator, device=device))]]
    if draws[-2] < cfg.shuffle:
        words = [words[i] for i in torch.randperm(len(words), generator=generator, device=device).tolist()]
    text = " ".join(words)
    if draws[-1] < cfg.template and cfg.templates:
        choice = int(torch.randint(len(cfg.templates), (), generator=generator, device=device))
        text = cfg.templates[choice].format(text)
    return text


def perturb_text(text: TextFeatures, sigma: float, generator: torch.Generator) -> TextFeatures:
    """Gaussian noise on the text features, `sigma` relative to each feature vector's norm (encoder-agnostic)."""
    if sigma <= 0:
        return text
    tokens, mask, pooled = text

    def noisy(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
        return x + sigma * x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5 * noise

    return TextFeatures(noisy(tokens), mask, noisy(pooled))


def build_dataset(data: TGSRDataConfig, seed: int):
    """The training set: one `CaptionedImageDataset`, or a mix of sources with their own settings."""
    from seesr.data.captioned import CaptionedImageDataset, ConcatCaptioned

    sources = data.train_data if isinstance(data.train_data, list) else [TGSRSourceConfig(path=data.train_data)]
    datasets = [
        CaptionedImageDataset(
            source.path,
            data.resolution,
            data.random_flip if source.random_flip is None else source.random_flip,
            data.repeats if source.repeats is None else source.repeats,
            data.cache_images,
            crop=source.crop or data.crop,
            seed=seed * 1_000 + number,
            caption_dropout=data.caption_dropout if source.caption_dropout is None else source.caption_dropout,
        )
        for number, source in enumerate(sources)
    ]
    return datasets[0] if len(datasets) == 1 else ConcatCaptioned(datasets)


def degradation_config(cfg: TGSRDataConfig) -> Any:
    """The Real-ESRGAN `DegradationConfig` of `cfg` (its `degradation_config` file, read here once), or None for
    the bicubic degradation."""
    if cfg.degradation == "bicubic":
        return None
    from seesr.data.degradation import DegradationConfig

    return load_config(DegradationConfig, cfg.degradation_config) if cfg.degradation_config else DegradationConfig()


def make_lq(gt: torch.Tensor, factor: int, cfg: TGSRDataConfig, generator: torch.Generator, degradation: Any = None):
    """(lq, gt) for one batch: bicubic through 8-bit PIL, or the Real-ESRGAN degradation (lazy import).

    `degradation` is `degradation_config(cfg)`, read once by the trainer (read here when not given)."""
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
    output = model(lq, **TextFeatures(*text).model_kwargs(), upscale=factor)
    terms = {"content": content_loss(cfg.loss.content_loss, output.sample, gt)}
    total = cfg.loss.content_weight * terms["content"]
    if cfg.loss.coarse_weight > 0:
        terms["coarse"] = content_loss(cfg.loss.content_loss, output.coarse_sample, gt)
        total = total + cfg.loss.coarse_weight * terms["coarse"]
    captioned = [i for i, c in enumerate(batch["caption"]) if c]
    if clip_loss is not None and captioned:
        terms["detail"] = clip_loss(output.sample[captioned], [batch["caption"][i] for i in captioned])
        total = total + cfg.loss.detail_weight * terms["detail"]
    if cfg.loss.agreement_weight > 0 and len(captioned) > 1:
        terms["agreement"] = agreement_loss(
            unwrap_model(model), text.pooled[captioned], gt[captioned], cfg.loss.agreement_temperature
        )
        total = total + cfg.loss.agreement_weight * terms["agreement"]
    terms["loss"] = total
    return terms


def unwrap_model(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model in .module


def agreement_loss(model: TGSRModel, pooled: torch.Tensor, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """Text-image agreement (as in the TGSR paper): a symmetric InfoNCE loss between the model's projection of
    each caption and its embedding of the HR detail of that image, the other images of the batch as negatives.
    It trains the text projection that FiLM reads to sort captions by what their images show, from the images
    themselves, so that captions of similar meaning land together."""
    logits = model.text_embedding(pooled) @ model.image_embedding(images).T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def build_model(cfg: TGSRTrainConfig, text_dim: int) -> TGSRModel:
    """The model to train: fresh from `model:`, or `pretrained_model` (extended by `model:` settings)."""
    if cfg.pretrained_model is not None:
        model = TGSRModel.from_pretrained(cfg.pretrained_model)
        if model.config.text_dim != text_dim:
            raise ValueError(f"pretrained_model text_dim={model.config.text_dim} != the text encoder's {text_dim}")
        if cfg.model:
            model = extend_model(model, cfg.model)
    else:
        model = TGSRModel(
            text_dim=text_dim, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
        )
    for factor in cfg.data.upscale_factors:
        model.check_upscale(factor)
    if cfg.loss.agreement_weight > 0 and not model.config.text_projection:
        raise ValueError(
            f"loss.agreement_weight={cfg.loss.agreement_weight} needs a model with text_projection > 0 "
            "(model.text_projection, with a film text_fusion)"
        )
    return model


def extend_model(model: TGSRModel, overrides: dict[str, Any]) -> TGSRModel:
    """`model` rebuilt with the `model:` settings `overrides` and its weights copied over: settings that only ADD
    modules (e.g. `text_fusion: all` and `text_projection` on a `both` model) give a model that starts exactly as
    `model` (new text paths start at zero); a setting that drops or reshapes a trained weight is an error."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    extended = TGSRModel(**config)
    state = model.state_dict()
    target = extended.state_dict()
    dropped = sorted(k for k in state if k not in target or target[k].shape != state[k].shape)
    if dropped:
        raise ValueError(
            f"model: {overrides} on pretrained_model would drop or reshape its trained weights ({dropped[:4]}"
            f"{' ...' if len(dropped) > 4 else ''}); only settings that add modules can be combined with it"
        )
    missing = extended.load_state_dict(state, strict=False).missing_keys
    logger.info("pretrained_model extended with %s: %d new tensors (%s ...)", overrides, len(missing), missing[:3])
    return extended


def export_pipeline(model: TGSRModel, text_encoder, tokenizer, cfg: TGSRTrainConfig) -> Path:
    from pipelines.pipeline_tgsr import TGSRPipeline

    export_dir = Path(cfg.export_dir or Path(cfg.train.output_dir) / "pipeline")
    source = cfg.text_encoder if cfg.text_encoder.startswith(PACKAGE_PREFIX) else None
    from seesr.staging import write_folder  # staged and swapped in whole, as `seesr convert` does

    pipeline = TGSRPipeline(model=model, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_source=source)
    write_folder(export_dir, pipeline.save_pretrained)
    logger.info("exported the TGSR pipeline to %s", export_dir)
    return export_dir


def train_tgsr(cfg: TGSRTrainConfig) -> Path:
    """Train (or resume) a TGSR model as configured with `run_training`; returns the exported pipeline folder."""
    from seesr.data.captioned import collate_captioned
    from seesr.training.loop import trainable_parameters

    args, data = cfg.train, cfg.data
    # 1. accelerator, frozen text encoder, model, optional CLIP
    accelerator = start_training(cfg, "tgsr")
    text_encoder, tokenizer = load_text_encoder(cfg.text_encoder)
    text_encoder.to(accelerator.device)
    model = build_model(cfg, text_hidden_size(text_encoder))
    model.train()
    clip_loss = CLIPDetailLoss(cfg.loss.clip_model).to(accelerator.device) if cfg.loss.detail_weight > 0 else None
    # 2. data (crops per (seed, epoch, index)), text features, the degradation config (read once)
    dataset = build_dataset(data, args.seed or 0)
    loader = shuffled_loader(dataset, args, collate_captioned)
    text_cache = TextFeatureCache(text_encoder, tokenizer, cfg.max_text_length)
    degradation = degradation_config(data)

    def loss(models, batch, generator):
        # every draw of this step comes from the step generator (seed, step): a resumed run repeats them
        captions = [
            "" if float(torch.rand((), generator=generator, device=generator.device)) < dropout
            else augment_caption(c, data.caption_augment, generator)
            for c, dropout in zip(batch["caption"], batch["caption_dropout"])
        ]  # fmt: skip
        factors = data.upscale_factors
        factor = factors[int(torch.randint(len(factors), (), generator=generator, device=generator.device))]
        with torch.autocast(accelerator.device.type, enabled=False):  # text features in full precision, as cached
            text = perturb_text(text_cache(captions, accelerator.device), data.text_noise, generator)
        batch = {"gt": batch["gt"], "caption": captions}
        return compute_loss(models["model"], batch, text, factor, cfg, clip_loss, generator, degradation)

    params = trainable_parameters(model)
    job = TrainingJob(
        models={"model": model},
        params=params,
        loader=loader,
        loss=loss,
        export=lambda models: export_pipeline(models["model"], text_encoder, tokenizer, cfg),
        export_dir=Path(cfg.export_dir or Path(args.output_dir) / "pipeline"),
        description=f"TGSR: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters, "
        f"{len(dataset.items)} images, {loader.num_workers} loader workers",
    )
    return run_training(accelerator, args, job)


def main(argv: list[str] | None = None) -> None:
    train_tgsr(config_from_cli(TGSRTrainConfig, "Train a TGSR (text-guided super-resolution) model.", argv))


if __name__ == "__main__":
    main()
