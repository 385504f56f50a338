"""Loads TGSRPipeline from the installed `seesr` distribution (pip install seesr)."""

from pipelines.pipeline_tgsr import TGSRPipeline  # noqa: F401
