"""Representation cross-attention (RCA): SeeSR's second cross-attention on the DAPE image tokens.

SeeSR adds, after every text cross-attention ``attentions[j]`` of every CrossAttn down / mid / up block, a stock
``Transformer2DModel`` stored at ``<block>.image_attentions.<j>`` whose cross-attention keys/values come from the
DAPE representation ``image_encoder_hidden_states`` (B, N, image_cross_attention_dim). The original code copies
diffusers' whole ``unet_2d_blocks.py`` for this; here the three stock block classes are subclassed, the
``image_attentions`` lists are added to an already-built stock UNet or ControlNet by :func:`add_rca`, and the
image tokens travel through a *copy* of ``cross_attention_kwargs`` under :data:`IMAGE_TOKENS_KEY`.

Forward order (as the original): down and up blocks run ``resnet -> attentions[i] (TCA) -> image_attentions[i]
(RCA)`` per layer; the mid block runs ``resnets[0]``, then per j ``attentions[j]``, ``image_attentions[j]``,
``resnets[j + 1]``. Without image tokens the blocks compute exactly what the stock blocks compute.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn
from torch import nn

IMAGE_TOKENS_KEY = "image_encoder_hidden_states"
RCA_MODULE_NAME = "image_attentions"


def split_image_tokens(cross_attention_kwargs: dict[str, Any] | None) -> tuple[torch.Tensor | None, dict | None]:
    """Take the image tokens out of a copy of ``cross_attention_kwargs`` (the caller's dict is never mutated)."""
    if not cross_attention_kwargs or IMAGE_TOKENS_KEY not in cross_attention_kwargs:
        return None, cross_attention_kwargs
    kwargs = dict(cross_attention_kwargs)
    tokens = kwargs.pop(IMAGE_TOKENS_KEY)
    return tokens, (kwargs or None)


def with_image_tokens(cross_attention_kwargs: dict[str, Any] | None, tokens: torch.Tensor | None) -> dict | None:
    """A copy of ``cross_attention_kwargs`` carrying ``tokens`` (the original when ``tokens`` is None)."""
    if tokens is None:
        return cross_attention_kwargs
    return {**(cross_attention_kwargs or {}), IMAGE_TOKENS_KEY: tokens}


def rca_kwargs(
    model: nn.Module, cross_attention_kwargs: dict[str, Any] | None, tokens: torch.Tensor | None, dtype: torch.dtype
) -> dict | None:
    """``cross_attention_kwargs`` for a forward of an RCA model: a copy carrying ``tokens`` cast to ``dtype``."""
    if tokens is None:
        return cross_attention_kwargs
    if not getattr(model, "rca_modules", None):
        raise ValueError(
            f"image_encoder_hidden_states given, but this {type(model).__name__} has no RCA "
            "(use_image_cross_attention=False)"
        )
    return with_image_tokens(cross_attention_kwargs, tokens.to(dtype))


class _RCAMixin:
    """Shared steps of the three RCA blocks. ``image_attentions`` is set by :func:`add_rca`."""

    image_attentions: nn.ModuleList

    def _resnet(self, resnet: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, hidden_states, temb)
        return resnet(hidden_states, temb)

    def _attend(
        self,
        j: int,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        image_tokens: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cross_attention_kwargs: dict[str, Any] | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Text cross-attention ``attentions[j]`` (TCA), then ``image_attentions[j]`` (RCA) when tokens are given."""
        masks = {"attention_mask": attention_mask, "encoder_attention_mask": encoder_attention_mask}
        hidden_states = self.attentions[j](
            hidden_states,
            encoder_hidden_states,
            cross_attention_kwargs=cross_attention_kwargs,
            **masks,
            return_dict=False,
        )[0]
        if image_tokens is not None:
            hidden_states = self.image_attentions[j](
                hidden_states, image_tokens, cross_attention_kwargs=cross_attention_kwargs, **masks, return_dict=False
            )[0]
        return hidden_states


class RCACrossAttnDownBlock2D(_RCAMixin, CrossAttnDownBlock2D):
    # Adapted from diffusers==0.42.1 CrossAttnDownBlock2D.forward (RCA after each text attention).
    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        additional_residuals: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        image_tokens, cross_attention_kwargs = split_image_tokens(cross_attention_kwargs)
        attend_args = (attention_mask, cross_attention_kwargs, encoder_attention_mask)
        output_states = ()
        for j, resnet in enumerate(self.resnets):
            hidden_states = self._resnet(resnet, hidden_states, temb)
            hidden_states = self._attend(j, hidden_states, encoder_hidden_states, image_tokens, *attend_args)
            if j == len(self.resnets) - 1 and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            output_states = output_states + (hidden_states,)

        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = downsampler(hidden_states)
            output_states = output_states + (hidden_states,)
        return hidden_states, output_states


class RCAUNetMidBlock2DCrossAttn(_RCAMixin, UNetMidBlock2DCrossAttn):
    # Adapted from diffusers==0.42.1 UNetMidBlock2DCrossAttn.forward (RCA after each text attention).
    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_tokens, cross_attention_kwargs = split_image_tokens(cross_attention_kwargs)
        attend_args = (attention_mask, cross_attention_kwargs, encoder_attention_mask)
        hidden_states = self.resnets[0](hidden_states, temb)
        for j, resnet in enumerate(self.resnets[1:]):
            hidden_states = self._attend(j, hidden_states, encoder_hidden_states, image_tokens, *attend_args)
            hidden_states = self._resnet(resnet, hidden_states, temb)
        return hidden_states


class RCACrossAttnUpBlock2D(_RCAMixin, CrossAttnUpBlock2D):
    # Adapted from diffusers==0.42.1 CrossAttnUpBlock2D.forward (RCA after each text attention; FreeU kept).
    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        upsample_size: int | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.utils.torch_utils import apply_freeu

        image_tokens, cross_attention_kwargs = split_image_tokens(cross_attention_kwargs)
        attend_args = (attention_mask, cross_attention_kwargs, encoder_attention_mask)
        freeu = all(getattr(self, name, None) for name in ("s1", "s2", "b1", "b2"))
        for j, resnet in enumerate(self.resnets):
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            if freeu:
                hidden_states, res_hidden_states = apply_freeu(
                    self.resolution_idx,
                    hidden_states,
                    res_hidden_states,
                    s1=self.s1,
                    s2=self.s2,
                    b1=self.b1,
                    b2=self.b2,
                )
            hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
            hidden_states = self._resnet(resnet, hidden_states, temb)
            hidden_states = self._attend(j, hidden_states, encoder_hidden_states, image_tokens, *attend_args)

        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


_RCA_BLOCKS: dict[type, type] = {
    CrossAttnDownBlock2D: RCACrossAttnDownBlock2D,
    UNetMidBlock2DCrossAttn: RCAUNetMidBlock2DCrossAttn,
    CrossAttnUpBlock2D: RCACrossAttnUpBlock2D,
}


def image_attention_like(text_attention: Transformer2DModel, image_cross_attention_dim: int) -> Transformer2DModel:
    """A new ``Transformer2DModel`` shaped like ``text_attention`` but attending to ``image_cross_attention_dim``."""
    if not isinstance(text_attention, Transformer2DModel):
        raise TypeError(f"RCA needs Transformer2DModel text attentions, got {type(text_attention).__name__}")
    config = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    config["cross_attention_dim"] = image_cross_attention_dim
    module = Transformer2DModel.from_config(config)
    weight = text_attention.proj_in.weight
    return nn.Module.to(module, device=weight.device, dtype=weight.dtype)


def add_rca(model: nn.Module, image_cross_attention_dim: int = 512) -> list[str]:
    """Add SeeSR's ``image_attentions`` to every CrossAttn block of a stock UNet or ControlNet, in place.

    Returns the names of the RCA module lists added. A block that already has RCA is left alone.
    """
    added = []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    blocks += [("mid_block", model.mid_block)] if getattr(model, "mid_block", None) is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(model, "up_blocks", []))]
    for name, block in blocks:
        rca_class = _RCA_BLOCKS.get(type(block))
        if rca_class is None:
            if hasattr(block, "attentions") and not isinstance(block, tuple(_RCA_BLOCKS.values())):
                raise TypeError(f"{name}: RCA is not supported for {type(block).__name__}")
            continue
        block.image_attentions = nn.ModuleList(
            [image_attention_like(attention, image_cross_attention_dim) for attention in block.attentions]
        )
        block.__class__ = rca_class
        added.append(f"{name}.{RCA_MODULE_NAME}")
    return added


def zero_rca_outputs(model: nn.Module) -> None:
    """Zero the output projections of every RCA module, so that new RCA starts as the identity."""
    for name, module in model.named_modules():
        if name.endswith(RCA_MODULE_NAME):
            for attention in module:
                nn.init.zeros_(attention.proj_out.weight)
                nn.init.zeros_(attention.proj_out.bias)
