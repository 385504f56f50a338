"""From tag logits to the hard prompt: per-class thresholds, names joined in class order.

RAM keeps a tag when ``sigmoid(logit) > threshold[class]`` (strictly greater), with the per-class thresholds of
``ram_tag_list_threshold.txt`` held as float32, and joins the kept names with ``", "`` in class-index order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TAG_SEPARATOR = ", "


def tag_mask(logits: torch.Tensor, thresholds: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(B, num_classes) bool: ``sigmoid(logits) > thresholds`` (thresholds compared as float32, like RAM)."""
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=logits.device)
    if logits.ndim != 2 or logits.shape[-1] != thresholds.shape[-1]:
        raise ValueError(f"logits must have shape (batch, {thresholds.shape[-1]}), got {tuple(logits.shape)}")
    return torch.sigmoid(logits) > thresholds


def logits_to_tags(
    logits: torch.Tensor,
    tag_names: Sequence[str],
    thresholds: torch.Tensor | Sequence[float],
    separator: str = TAG_SEPARATOR,
) -> list[str]:
    """One tag string per batch item: the names of the classes above threshold, in class order."""
    if len(tag_names) != logits.shape[-1]:
        raise ValueError(f"got {len(tag_names)} tag names for {logits.shape[-1]} classes")
    mask = tag_mask(logits, thresholds).cpu()
    return [separator.join(tag_names[i] for i in row.nonzero().flatten().tolist()) for row in mask]
