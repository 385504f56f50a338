"""seesr: semantics-aware real-world image super-resolution (SeeSR, TGSR) on current diffusers.

Exports are resolved lazily so that ``import seesr`` (and the ``seesr`` command's start-up) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SeeSRUNet2DConditionModel": "seesr.unet",
    "SeeSRControlNetModel": "seesr.controlnet",
    "add_rca": "seesr.rca",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seesr' has no attribute {name!r}")
