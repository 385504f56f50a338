"""LPIPS (Zhang et al., 2018) with the VGG16 backbone, in plain torch: no torchvision / lpips dependency.

``LPIPS()(x, y)`` takes images in ``[-1, 1]`` (B, 3, H, W) and returns the distance per image, shape (B, 1, 1, 1),
as the reference ``lpips.LPIPS(net="vgg")(x, y)``: an ImageNet-style scaling of the input, the ReLU outputs of the
five VGG16 stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), each unit-normalised over channels, squared
differences weighted by the learned 1x1 "linear" heads, averaged over space and summed over stages.

Weights are not shipped. ``load_lpips(lin=..., vgg=...)`` reads them from the user's files, strictly (every tensor
used, nothing missing) and safely (safetensors, or ``torch.load(weights_only=True)``). Accepted layouts:

* the official linear heads, ``lpips/weights/v0.1/vgg.pth``: ``lin{0..4}.model.1.weight`` of shape (1, C, 1, 1);
* the torchvision VGG16 ImageNet weights (``vgg16-397923af.pth``): ``features.{i}.weight|bias`` for the 13 convs
  (``classifier.*`` is ignored);
* a full ``lpips.LPIPS`` state dict in one file (``net.slice{k}.{i}.weight|bias`` + ``lin{k}.model.1.weight``,
  scaling buffers ignored);
* this module's own layout (``features.{i}.*`` + ``lin{k}.weight``), which ``save_lpips`` writes as safetensors.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# VGG16 `features` up to relu5_3: channel widths, "M" = 2x2 max pool (torchvision indices are preserved).
VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip
# Index (in `features`) of the ReLU ending each of the five stages LPIPS taps.
STAGE_ENDS: tuple[int, ...] = (3, 8, 15, 22, 29)
STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: inputs in [-1, 1] are mapped with (x - shift) / scale.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = int(item)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG distance (``version 0.1``, ``lpips=True``, spatial average). Randomly initialised until weights are
    loaded (see `load_lpips`); frozen by default (``requires_grad_(False)``, eval mode): gradients flow to the
    inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        for k, channels in enumerate(STAGE_CHANNELS):
            self.add_module(f"lin{k}", nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised VGG stage outputs of ``images`` in [-1, 1]."""
        x = (images - self.shift.to(images.dtype)) / self.scale.to(images.dtype)
        outputs = []
        for i, layer in enumerate(self.features[: STAGE_ENDS[-1] + 1]):
            x = layer(x)
            if i in STAGE_ENDS:
                outputs.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return outputs

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distance between ``input`` and ``target`` (both (B, 3, H, W) in [-1, 1]) per image, (B, 1, 1, 1)."""
        if input.shape != target.shape or input.ndim != 4 or input.shape[1] != 3:
            raise ValueError(f"LPIPS: expected two (B, 3, H, W) tensors, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}")  # fmt: skip
        total = 0
        for k, (a, b) in enumerate(zip(self.stage_features(input), self.stage_features(target), strict=True)):
            total = total + getattr(self, f"lin{k}")((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return total


# ------------------------------------------------------------------------------------------------ weights


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unpickling refusal as a bad input
        raise ValueError(f"{path}: not a weights_only torch file ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return state


_SLICE_KEY = re.compile(r"^(?:module\.)?net\.slice\d\.(\d+)\.(weight|bias)$")
_TV_KEY = re.compile(r"^(?:module\.)?features\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^(?:module\.)?lin(\d)\.(?:model\.1\.)?weight$")
_IGNORED = re.compile(r"^(?:module\.)?(?:classifier\..*|scaling_layer\.(?:shift|scale)|shift|scale)$")


def to_lpips_layout(state: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """Map any accepted layout (see the module docstring) to this module's keys; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := _SLICE_KEY.match(key) or _TV_KEY.match(key):
            out[f"features.{match.group(1)}.{match.group(2)}"] = value
        elif match := _LIN_KEY.match(key):
            out[f"lin{match.group(1)}.weight"] = value
        elif not _IGNORED.match(key):
            raise ValueError(f"{source}: unexpected LPIPS/VGG key {key!r}")
    return out


def load_lpips(*paths: str | Path, device: torch.device | str | None = None) -> LPIPS:
    """An `LPIPS` with weights from one or more files (e.g. ``lin="vgg.pth"`` and the torchvision VGG16 file, or
    one full file). Every VGG conv up to relu5_3 and all five heads must be present; a key found twice, an
    unexpected key or a wrong shape is an error naming it and its file."""
    if not paths:
        raise ValueError("load_lpips: expected at least one weights file")
    model = LPIPS()
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, value in to_lpips_layout(read_weights(path), str(path)).items():
            if key in loaded:
                raise ValueError(f"{path}: {key!r} is also in an earlier LPIPS weights file")
            if key not in expected:
                raise ValueError(f"{path}: {key!r} is not an LPIPS-VGG weight (VGG16 convs up to relu5_3)")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(expected[key].shape)}")  # fmt: skip
            loaded[key] = value.float()
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"LPIPS weights {[str(p) for p in paths]}: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''} ({len(missing)} tensors)")  # fmt: skip
    model.load_state_dict(loaded, strict=True)
    return model.to(device) if device is not None else model


def save_lpips(model: LPIPS, path: str | Path) -> None:
    """Write ``model``'s weights as one safetensors file (this module's layout), atomically."""
    from safetensors.torch import save_file

    from seesr.image_io import atomic_save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save_file(lambda tmp: save_file(state, str(tmp)), path)
