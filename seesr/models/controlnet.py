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
from .unet import SeeSRUNet2DConditionModel, StrictLoadingMixin

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
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
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
        super().__init__(
            in_channels=in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            only_cross_attention=only_cross_attention,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            global_pool_conditions=global_pool_conditions,
            addition_embed_type_num_heads=addition_embed_type_num_heads,
        )
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

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        image_encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **controlnet_kwargs: Any,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The stock ControlNet forward; ``image_encoder_hidden_states`` feeds RCA (skipped when None)."""
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
