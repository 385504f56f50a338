"""The networks and their loading; nothing here imports training, the CLI or the pipelines.

- `rca`: SeeSR's representation cross-attention (RCA) blocks, added to diffusers' cross-attention blocks;
- `unet`: `SeeSRUNet2DConditionModel` (a diffusers UNet with RCA; loads the released SeeSR folders strictly);
- `controlnet`: `SeeSRControlNetModel` (SeeSR's ControlNet with RCA, built from the UNet);
- `tgsr`: `TGSRModel` (the text-guided SR network), its text encoder loading and `default_model_path()`;
- `onestep`: OSEDiff's one-step LoRA surgery on stock diffusers models and the released `osediff.pkl` layout.

Room for more networks (e.g. one-step LoRA surgery) as one module each. Exports are resolved lazily.
"""

from __future__ import annotations

from seesr.lazy import lazy_exports

_EXPORTS = {
    "SeeSRUNet2DConditionModel": "seesr.models.unet",
    "SeeSRControlNetModel": "seesr.models.controlnet",
    "TGSRModel": "seesr.models.tgsr",
    "add_rca": "seesr.models.rca",
    "OneStepUNet2DConditionModel": "seesr.models.onestep",
    "OneStepAutoencoderKL": "seesr.models.onestep",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
