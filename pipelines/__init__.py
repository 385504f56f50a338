"""Diffusers pipelines of the seesr toolkit: SeeSRPipeline, OSEDiffPipeline and TGSRPipeline (resolved lazily)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OSEDiffPipeline": "pipelines.pipeline_osediff",
    "OSEDiffPipelineOutput": "pipelines.pipeline_osediff",
    "SeeSRPipeline": "pipelines.pipeline_seesr",
    "SeeSRPipelineOutput": "pipelines.pipeline_seesr",
    "TGSRPipeline": "pipelines.pipeline_tgsr",
    "TGSRPipelineOutput": "pipelines.pipeline_tgsr",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
