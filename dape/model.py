"""`DAPEModel`: the degradation-aware prompt extractor of SeeSR (RAM Swin-L + tagging head, LoRA-tuned).

``forward(pixel_values)`` returns the representation embedding ("soft prompt", ``image_embeds``,
(B, 145, 512) at full size) and the tag logits; `DAPEModel.tags` turns logits into the hard prompt.
The tag names and per-class thresholds are config fields, so they travel with ``save_pretrained`` folders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from . import lora as _lora
from .backbone import SwinEncoder, TaggingHead
from .preprocess import ImageInput, preprocess_images
from .tags import TAG_SEPARATOR, logits_to_tags, tag_mask


@dataclass
class DAPEOutput(BaseOutput):
    """
    Args:
        image_embeds: (B, 1 + tokens, projection_dim) representation embedding: the projected
            ``[mean-pooled token, Swin tokens]``, the K/V of SeeSR's representation cross-attention.
        logits: (B, num_classes) tag logits, or None when ``output_logits=False``.
    """

    image_embeds: torch.Tensor
    logits: torch.Tensor | None = None


def _validate_tags(tag_names: Sequence[str], tag_thresholds: Sequence[float]) -> None:
    if isinstance(tag_names, str) or not all(isinstance(name, str) for name in tag_names):
        raise TypeError("tag_names must be a list of strings")
    if not tag_names:
        raise ValueError("tag_names is empty")
    if len(tag_thresholds) != len(tag_names):
        raise ValueError(f"got {len(tag_thresholds)} tag_thresholds for {len(tag_names)} tag_names")
    bad = [(i, t) for i, t in enumerate(tag_thresholds) if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise ValueError(f"tag_thresholds must lie in [0, 1]; got (index, value) {bad[:5]}")


class DAPEModel(ModelMixin, ConfigMixin):
    r"""Degradation-aware prompt extractor (RAM as SeeSR uses it).

    The defaults are the released model: Swin-L at 384 px (embed 192, depths 2/2/18/2, heads 6/12/24/48, window
    12), a 1536 -> 512 ``image_proj``, and a 2-layer, 4-head, 768-wide tagging head. Pre-processing:
    `dape.preprocess_images` (or `DAPEModel.preprocess`).

    Args:
        tag_names: one name per class, in class order.
        tag_thresholds: per-class probability thresholds in [0, 1]; a tag is kept when ``sigmoid(logit) > t``.
        image_size: input side in pixels (square).
        drop_path_rate, tagging_dropout: RAM's stochastic depth (0.1) and BERT dropout (0.1); active only in
            training mode.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        tag_names: list[str],
        tag_thresholds: list[float],
        image_size: int = 384,
        patch_size: int = 4,
        in_channels: int = 3,
        embed_dim: int = 192,
        depths: tuple[int, ...] = (2, 2, 18, 2),
        num_heads: tuple[int, ...] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        projection_dim: int = 512,
        tagging_hidden_size: int = 768,
        tagging_num_layers: int = 2,
        tagging_num_heads: int = 4,
        tagging_intermediate_size: int = 3072,
        tagging_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _validate_tags(tag_names, tag_thresholds)
        self.image_encoder = SwinEncoder(
            image_size,
            patch_size,
            in_channels,
            embed_dim,
            tuple(depths),
            tuple(num_heads),
            window_size,
            mlp_ratio,
            drop_path_rate,
        )
        self.image_proj = torch.nn.Linear(self.image_encoder.num_features, projection_dim)
        self.tagging_head = TaggingHead(
            len(tag_names),
            projection_dim,
            tagging_hidden_size,
            tagging_num_layers,
            tagging_num_heads,
            tagging_intermediate_size,
            tagging_dropout,
        )

    @property
    def num_classes(self) -> int:
        return len(self.config.tag_names)

    @property
    def num_tokens(self) -> int:
        """Length of ``image_embeds``: 1 + the number of tokens of the last Swin stage (145 at full size)."""
        side = self.config.image_size // self.config.patch_size // 2 ** (len(self.config.depths) - 1)
        return 1 + side * side

    def forward(
        self, pixel_values: torch.Tensor, output_logits: bool = True, return_dict: bool = True
    ) -> DAPEOutput | tuple:
        """
        Args:
            pixel_values: (B, in_channels, image_size, image_size), ImageNet-normalized (see `preprocess`).
            output_logits: run the tagging head; ``False`` returns only ``image_embeds`` (all SeeSR's
                denoiser needs), ``logits=None``.
            return_dict: return a `DAPEOutput` instead of a tuple.
        """
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )
        pixel_values = pixel_values.to(self.image_proj.weight.dtype)
        image_embeds = self.image_proj(self.image_encoder(pixel_values))
        logits = self.tagging_head(image_embeds) if output_logits else None
        if not return_dict:
            return (image_embeds,) if logits is None else (image_embeds, logits)
        return DAPEOutput(image_embeds=image_embeds, logits=logits)

    def preprocess(self, images: ImageInput, antialias: bool = False, mode: str = "bilinear") -> torch.Tensor:
        """`dape.preprocess_images` at this model's ``image_size``, on its device and dtype."""
        return preprocess_images(
            images, self.config.image_size, antialias=antialias, mode=mode, device=self.device, dtype=self.dtype
        )

    def tag_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) bool: the classes whose probability exceeds their threshold."""
        return tag_mask(logits, self.config.tag_thresholds)

    def tags(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        logits: torch.Tensor | None = None,
        separator: str = TAG_SEPARATOR,
    ) -> list[str]:
        """The hard prompt, one string per image: kept tag names joined with ``", "`` in class order.

        Pass either ``pixel_values`` (runs the model without gradients) or the ``logits`` of a `forward`.
        """
        if (pixel_values is None) == (logits is None):
            raise ValueError("pass exactly one of pixel_values and logits")
        if logits is None:
            with torch.no_grad():
                logits = self(pixel_values).logits
        return logits_to_tags(logits, self.config.tag_names, self.config.tag_thresholds, separator)

    # LoRA (see dape.lora) --------------------------------------------------------------------------------------

    def add_lora(self, rank: int = _lora.LORA_RANK, alpha: float = _lora.LORA_ALPHA, dropout: float = 0.0) -> None:
        """Add DAPE's trainable LoRA adapters (q/v of every Swin attention, q/k of the tagging head).

        Only the adapters require gradients afterwards. Merge them with `merge_lora` before `save_pretrained`.
        """
        _lora.add_lora(self, rank=rank, alpha=alpha, dropout=dropout)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the base weights and remove them (the inference layout)."""
        _lora.merge_lora(self)

    @property
    def has_lora(self) -> bool:
        return _lora.has_lora(self)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """`ModelMixin.save_pretrained`, refused while unmerged LoRA adapters are attached.

        A saved DAPE folder holds the plain (merged) layout that `from_pretrained` builds; save adapters during
        training with `dape.lora.lora_state_dict` instead.
        """
        if self.has_lora:
            raise ValueError(
                "this DAPEModel has unmerged LoRA adapters; call merge_lora() before save_pretrained(), "
                "or save dape.lora.lora_state_dict(model) for a training checkpoint"
            )
        super().save_pretrained(save_directory, *args, **kwargs)
