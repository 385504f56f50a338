"""Loads TGSRPipeline from the installed `seesr` distribution.

seesr is not on a public package index: install it from its source tree (`pip install
/path/to/seesr-checkout`) or from a wheel built there (`pip wheel --no-deps /path/to/seesr-checkout
-w dist/`, then install that wheel).
"""

from pipelines.pipeline_tgsr import TGSRPipeline  # noqa: F401
