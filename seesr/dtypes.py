"""The one table of dtype names: the short names of the command line and configs -> torch dtype names.

Standard library only, so that command modules can use it to build their argument parsers.
"""

from __future__ import annotations

from typing import Any

#: short name (``--dtype``, ``mixed_precision``) -> torch dtype name
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a short (``fp16``) or torch (``float16``) name; ``"no"`` (no mixed precision) is float32."""
    import torch

    full = DTYPE_NAMES.get(name, "float32" if name == "no" else name)
    if full not in DTYPE_NAMES.values():
        raise ValueError(f"dtype: expected one of {[*DTYPE_NAMES, *DTYPE_NAMES.values()]}, got {name!r}")
    return getattr(torch, full)
