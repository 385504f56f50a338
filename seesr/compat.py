"""Compatibility shims: the module paths of the flat layout before the reorganisation by role (issue #11).

``import seesr.unet`` (and every other path in `MOVED`) gives the module at its new path: the very same module
object, so classes, private helpers and monkeypatching behave as before. Pipeline folders saved before the move
name these paths in their ``model_index.json`` (``seesr.unet``, ``seesr.controlnet``, ``seesr.tgsr``), so the
shims for those stay as long as such folders are around; the others are for code written against the old layout
and may go in a later release. `seesr/__init__.py` installs the finder; new code imports the new paths.

The old ``seesr.data``, ``seesr.training`` and ``seesr.cli`` modules became the packages of the same name, which
re-export what the modules held.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

#: old module path -> new module path
MOVED: dict[str, str] = {
    "seesr.rca": "seesr.models.rca",
    "seesr.unet": "seesr.models.unet",
    "seesr.controlnet": "seesr.models.controlnet",
    "seesr.tgsr": "seesr.models.tgsr",
    "seesr.degradation": "seesr.data.degradation",
    "seesr.jpeg": "seesr.data.jpeg",
    "seesr.tgsr_data": "seesr.data.captioned",
    "seesr.pairs": "seesr.cli.make_pairs",  # the command; it re-exports make_pairs (seesr.data.pairs)
    "seesr.config": "seesr.training.config",
    "seesr.train": "seesr.training.controlnet",
    "seesr.tgsr_train": "seesr.training.tgsr",
    "seesr.upscale": "seesr.cli.upscale",
    "seesr.convert": "seesr.cli.convert",
    "seesr.evaluate": "seesr.cli.evaluate",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new path (the import system then binds the old name to it)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module is already executed."""


#: the old paths that saved pipeline folders name in their model_index.json
SAVED_FOLDER_PATHS = ("seesr.unet", "seesr.controlnet", "seesr.tgsr")

_FINDER = _MovedModuleFinder()


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_FINDER)


def import_saved_folder_paths() -> None:
    """Import the old paths that saved folders name: diffusers loads a component only from an imported module."""
    install()
    for name in SAVED_FOLDER_PATHS:
        importlib.import_module(name)
