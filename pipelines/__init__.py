"""Diffusers pipelines of the seesr toolkit: SeeSRPipeline, OSEDiffPipeline and TGSRPipeline (resolved lazily)."""

from __future__ import annotations

from seesr.lazy import lazy_exports

_MODULES = {
    "pipelines.pipeline_osediff": ("OSEDiffPipeline", "OSEDiffPipelineOutput"),
    "pipelines.pipeline_seesr": ("SeeSRPipeline", "SeeSRPipelineOutput"),
    "pipelines.pipeline_tgsr": ("TGSRPipeline", "TGSRPipelineOutput"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
