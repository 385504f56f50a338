"""Training: shared plumbing, the typed config loader and one module per trainer.

- `loop`: the loop every trainer runs (`TrainingJob` + `run_training`) and its plumbing (accelerator, optimizer,
  LR schedule, checkpoints and exact resume, logging, seeded data order and step generators, the gradient step);
- `config`: typed YAML configs (dataclasses) with ``key=value`` overrides;
- `controlnet`: the SeeSR ControlNet (+ RCA) trainer (``train_controlnet.py``);
- `tgsr`: the TGSR trainer (``train_tgsr.py``);
- `osediff`: the one-step (OSEDiff) trainer (``train_osediff.py``).

DAPE's trainer lives in `dape.train` and uses only this package's shared modules. The names of the former
``seesr.training`` module (`TrainingArgs`, `make_accelerator`, ...) are re-exported lazily from `loop`.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    loop = importlib.import_module("seesr.training.loop")
    try:
        return getattr(loop, name)
    except AttributeError:
        raise AttributeError(f"module 'seesr.training' has no attribute {name!r}") from None
