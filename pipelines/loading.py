"""Saved pipeline folders that also load with ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``.

diffusers finds a non-diffusers pipeline class through ``model_index.json``'s ``_class_name`` = ``[file, class]``
and a ``<file>.py`` in the folder. The file written here is two lines that import the class from the installed
package, so the folder holds no code of its own; loading through the class itself needs no remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from seesr.compat import import_saved_folder_paths

# Folders saved before the reorganisation by role name `seesr.unet` / `seesr.controlnet` / `seesr.tgsr`.
import_saved_folder_paths()


class InstalledCodeLoaderMixin:
    """For a ``DiffusionPipeline`` subclass: ``_write_loader`` after saving; ``load_config`` reads the entry."""

    #: The loader file's name (without .py) in saved folders.
    loader_file: str

    def _write_loader(self, save_directory: str | os.PathLike, index_updates: dict[str, Any] | None = None) -> None:
        """Point ``model_index.json`` at the loader file (plus ``index_updates``) and write that file."""
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index.update(index_updates or {})
        index["_class_name"] = [self.loader_file, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / f"{self.loader_file}.py").write_text(
            f'"""Loads {type(self).__name__} from the installed `seesr` distribution (pip install seesr)."""\n\n'
            f"from {type(self).__module__} import {type(self).__name__}  # noqa: F401\n"
        )

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any):
        """Read ``model_index.json``; our own class needs no remote code, so the loader-file entry is dropped."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return result
