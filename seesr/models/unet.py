"""SeeSR's UNet: the stock diffusers ``UNet2DConditionModel`` plus representation cross-attention (RCA).

Loads the released ``seesr/unet`` folder unchanged (``config.json`` with ``"use_image_cross_attention": true``,
stock diffusers key names plus ``*.image_attentions.*``), strictly: a missing or unexpected key is an error.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (the pipeline loader looks it up here)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from .rca import RCA_MODULE_NAME, add_rca, rca_kwargs, zero_rca_outputs

logger = logging.getLogger(__name__)


def check_loading_info(info: dict[str, list], name: str, source: str | os.PathLike) -> None:
    """Raise if ``from_pretrained(..., output_loading_info=True)`` reported any missing / unexpected key."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        missing = info.get("missing_keys") or []
        hint = ""
        if missing and all(f".{RCA_MODULE_NAME}." in k for k in missing) and not info.get("unexpected_keys"):
            hint = (
                " (only RCA weights are missing: a stock Stable Diffusion folder? use from_sd_unet to start training)"
            )
        raise ValueError(
            f"{name}: the weights in {source} do not match the model config; " + "; ".join(problems) + hint
        )


#: The down blocks of Stable Diffusion 1.x / 2.x: the default of the UNet and the ControlNet (as in diffusers).
SD_DOWN_BLOCK_TYPES: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)


def stock_arguments(stock_class: type, arguments: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``arguments`` (a subclass ``__init__``'s ``locals()``) that ``stock_class.__init__`` takes.

    The SeeSR models declare every stock argument explicitly (their configs keep exactly these keys) and pass them
    all on unchanged with this; their own RCA arguments are not stock ones and stay behind (tests/test_drift.py checks
    that each signature is exactly the stock one plus the RCA arguments).
    """
    names = inspect.signature(stock_class.__init__).parameters
    return {name: value for name, value in arguments.items() if name in names and name != "self"}


class StrictLoadingMixin:
    """``from_pretrained`` that fails on any missing or unexpected key instead of initialising it randomly."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        where = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        check_loading_info(info, cls.__name__, where)
        return (model, info) if wants_info else model


class SeeSRUNet2DConditionModel(StrictLoadingMixin, UNet2DConditionModel):
    """``UNet2DConditionModel`` with SeeSR's RCA after every text cross-attention.

    Extra config fields: ``use_image_cross_attention`` (add RCA; False gives the stock UNet) and
    ``image_cross_attention_dim`` (width of the DAPE tokens, 512 in SeeSR; not in the released config, whose
    value it defaults to). ``forward`` takes ``image_encoder_hidden_states`` (B, N, image_cross_attention_dim);
    without it RCA is skipped and the output equals the stock UNet's.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = SD_DOWN_BLOCK_TYPES,
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-05,
        cross_attention_dim: int | tuple[int] = 1280,
        transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
        reverse_transformer_layers_per_block: tuple[tuple[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int] = 8,
        num_attention_heads: int | tuple[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        use_image_cross_attention: bool = True,
        image_cross_attention_dim: int = 512,
    ):
        super().__init__(**stock_arguments(UNet2DConditionModel, locals()))
        self.rca_modules = add_rca(self, image_cross_attention_dim) if use_image_cross_attention else []

    @classmethod
    def from_sd_unet(
        cls,
        unet: UNet2DConditionModel | str | os.PathLike,
        subfolder: str | None = "unet",
        image_cross_attention_dim: int = 512,
        zero_init_rca: bool = False,
        **load_kwargs: Any,
    ) -> SeeSRUNet2DConditionModel:
        """Training start: a Stable Diffusion UNet (model, folder or hub id) with newly initialised RCA.

        The SD weights are copied exactly; the RCA modules keep their default initialisation (as SeeSR) or,
        with ``zero_init_rca``, get zero output projections so that the new model starts as the SD UNet.
        """
        if not isinstance(unet, UNet2DConditionModel):
            unet = UNet2DConditionModel.from_pretrained(unet, subfolder=subfolder, **load_kwargs)
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        config.update(use_image_cross_attention=True, image_cross_attention_dim=image_cross_attention_dim)
        model = nn.Module.to(cls.from_config(config), dtype=unet.dtype)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        not_rca = [k for k in missing if f".{RCA_MODULE_NAME}." not in k]
        if not_rca or unexpected:
            raise ValueError(f"from_sd_unet: unexpected key mismatch: missing {not_rca}, unexpected {unexpected}")
        if zero_init_rca:
            zero_rca_outputs(model)
        return model

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        image_encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **unet_kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """The stock UNet forward; ``image_encoder_hidden_states`` feeds RCA (skipped when None)."""
        return super().forward(
            sample,
            timestep,
            encoder_hidden_states,
            cross_attention_kwargs=rca_kwargs(self, cross_attention_kwargs, image_encoder_hidden_states, sample.dtype),
            return_dict=return_dict,
            **unet_kwargs,
        )
