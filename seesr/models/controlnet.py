"""SeeSR's ControlNet: the stock diffusers ``ControlNetModel`` plus representation cross-attention (RCA).

Loads the released ``seesr/controlnet`` folder unchanged, strictly. ``from_unet`` builds it from a
:class:`~seesr.models.unet.SeeSRUNet2DConditionModel`, copying the encoder half including the RCA weights (as SeeSR).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import ControlNetOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (the pipeline loader looks it up here)
from torch import nn

from .rca import add_rca, rca_kwargs
from .unet import SD_DOWN_BLOCK_TYPES, SeeSRUNet2DConditionModel, StrictLoadingMixin, stock_arguments

_COPIED_FROM_UNET = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "class_embedding",
    "add_embedding",
    "down_blocks",
    "mid_block",
)


class SeeSRControlNetModel(StrictLoadingMixin, ControlNetModel):
    """``ControlNetModel`` with SeeSR's RCA in its down and mid blocks (config as the UNet's)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = SD_DOWN_BLOCK_TYPES,
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-05,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        use_image_cross_attention: bool = True,
        image_cross_attention_dim: int = 512,
    ):
        super().__init__(**stock_arguments(ControlNetModel, locals()))
        self.rca_modules = add_rca(self, image_cross_attention_dim) if use_image_cross_attention else []

    @classmethod
    def from_unet(
        cls,
        unet: SeeSRUNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> SeeSRControlNetModel:
        """A ControlNet shaped like ``unet``'s encoder, with its weights (RCA included) copied exactly."""
        names = set(cls._get_init_keys(cls)) - {"self"}
        config = {k: v for k, v in unet.config.items() if k in names}
        config.update(
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
            use_image_cross_attention=bool(getattr(unet, "rca_modules", [])),
        )
        controlnet = nn.Module.to(cls.from_config(config), dtype=unet.dtype)
        if load_weights_from_unet:
            for name in _COPIED_FROM_UNET:
                source, target = getattr(unet, name, None), getattr(controlnet, name, None)
                if (source is None) != (target is None):
                    raise ValueError(f"from_unet: {name} exists in only one of the UNet and the ControlNet")
                if target is not None:
                    target.load_state_dict(source.state_dict(), strict=True)
        return controlnet

    def embed_condition(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """``controlnet_cond_embedding`` of a control image as ``forward`` computes it (``controlnet_cond_embeds``)."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        return self.controlnet_cond_embedding(controlnet_cond)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor | None,
        conditioning_scale: float = 1.0,
        image_encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        controlnet_cond_embeds: torch.Tensor | None = None,
        **controlnet_kwargs: Any,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The stock ControlNet forward; ``image_encoder_hidden_states`` feeds RCA (skipped when None).

        ``controlnet_cond_embeds``: the output of ``controlnet_cond_embedding(controlnet_cond)`` computed beforehand
        (it does not depend on the step, so the pipeline computes it once per image / tile); ``controlnet_cond`` is
        then ignored. The result is bitwise the same as passing ``controlnet_cond``.
        """
        if controlnet_cond_embeds is not None:
            embedding = self._modules["controlnet_cond_embedding"]
            self._modules["controlnet_cond_embedding"] = _Given(controlnet_cond_embeds)
            try:
                return self.forward(
                    sample,
                    timestep,
                    encoder_hidden_states,
                    controlnet_cond_embeds,
                    conditioning_scale=conditioning_scale,
                    image_encoder_hidden_states=image_encoder_hidden_states,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=return_dict,
                    **controlnet_kwargs,
                )
            finally:
                self._modules["controlnet_cond_embedding"] = embedding
        return super().forward(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=conditioning_scale,
            cross_attention_kwargs=rca_kwargs(self, cross_attention_kwargs, image_encoder_hidden_states, sample.dtype),
            return_dict=return_dict,
            **controlnet_kwargs,
        )


class _Given(nn.Module):
    """Stands in for ``controlnet_cond_embedding`` during one call: returns the precomputed embedding."""

    def __init__(self, embeds: torch.Tensor):
        super().__init__()
        self.embeds = embeds

    def forward(self, _cond: torch.Tensor) -> torch.Tensor:
        return self.embeds
