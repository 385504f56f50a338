"""DAPE, SeeSR's degradation-aware prompt extractor (RAM Swin-L + tagging head, LoRA-tuned).

The public names below are resolved on first access: ``seesr`` imports `dape.command` to build its argument
parser, and that must not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DAPEModel": "dape.model",
    "DAPEOutput": "dape.model",
    "preprocess_images": "dape.preprocess",
    "IMAGENET_MEAN": "dape.preprocess",
    "IMAGENET_STD": "dape.preprocess",
    "logits_to_tags": "dape.tags",
    "tag_mask": "dape.tags",
    "add_lora": "dape.lora",
    "merge_lora": "dape.lora",
    "lora_state_dict": "dape.lora",
    "convert_ram_checkpoint": "dape.convert",
    "convert_dape_folder": "dape.convert",
}

__all__ = [
    "DAPEModel",
    "DAPEOutput",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "add_lora",
    "convert_dape_folder",
    "convert_ram_checkpoint",
    "logits_to_tags",
    "lora_state_dict",
    "merge_lora",
    "preprocess_images",
    "tag_mask",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .convert import convert_dape_folder, convert_ram_checkpoint
    from .lora import add_lora, lora_state_dict, merge_lora
    from .model import DAPEModel, DAPEOutput
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_images
    from .tags import logits_to_tags, tag_mask


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dape' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
