"""seesr: semantics-aware real-world image super-resolution (SeeSR, TGSR) on current diffusers.

Where things live (see README.md, "Layout"):

- `seesr.models`: the networks and their loading (RCA blocks, SeeSR UNet and ControlNet, TGSR network and its
  text encoder);
- `seesr.data`: the Real-ESRGAN degradation (and its JPEG), the SeeSR and TGSR training datasets, make-pairs;
- `seesr.training`: the shared training plumbing, the typed config loader and one module per trainer;
- `seesr.cli`: the ``seesr`` command's dispatcher and one module per subcommand;
- top level: `seesr.conditioning` (LQ image + prompt -> the denoiser's condition), `seesr.denoise` (one noise
  prediction), `seesr.image_io` (image files in and out, tensor <-> PIL), `seesr.color` (colour fix),
  `seesr.metrics`, `seesr.dtypes` (the dtype-name table), `seesr.lazy` (lazy package exports);
- `seesr.compat`: the old flat module paths (``seesr.unet``, ``seesr.tgsr``, ...) as aliases of the new ones.

The pipelines are in the top-level `pipelines` package and DAPE in `dape`. Exports are resolved lazily so that
``import seesr`` (and the ``seesr`` command's start-up) stays fast.
"""

from __future__ import annotations

from seesr import compat as _compat
from seesr.lazy import lazy_exports

__version__ = "0.1.0"

_compat.install()

_EXPORTS = {
    "SeeSRUNet2DConditionModel": "seesr.models.unet",
    "SeeSRControlNetModel": "seesr.models.controlnet",
    "add_rca": "seesr.models.rca",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)
