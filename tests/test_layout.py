"""The layout by role (issue #11): old module paths still import, public imports hold, no back-arrows."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from seesr.compat import MOVED

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_former_modules_that_became_packages_keep_their_names():
    from seesr.cli import COMMANDS, main  # noqa: F401
    from seesr.data import ImageFolderDataset, collate
    from seesr.data.image_folder import ImageFolderDataset as new_dataset
    from seesr.data.image_folder import collate as new_collate
    from seesr.training import TrainingArgs, epoch_batches
    from seesr.training.loop import TrainingArgs as new_args
    from seesr.training.loop import epoch_batches as new_batches

    assert (ImageFolderDataset, collate, TrainingArgs, epoch_batches) == (
        new_dataset,
        new_collate,
        new_args,
        new_batches,
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        importlib.import_module("seesr.training").nothing_here  # noqa: B018


def test_readme_imports():
    from dape import DAPEModel  # noqa: F401
    from pipelines import SeeSRPipeline, TGSRPipeline  # noqa: F401
    from seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    default_model_path = importlib.import_module("seesr.tgsr").default_model_path  # the README's old path

    assert SeeSRUNet2DConditionModel.__module__ == "seesr.models.unet"
    assert SeeSRControlNetModel.__module__ == "seesr.models.controlnet"
    assert (default_model_path() / "model_index.json").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an ``import`` / ``from ... import`` in ``path`` names (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


LOWER_LAYERS = {
    "seesr/models": ("seesr.training", "seesr.cli", "pipelines", "seesr.data", *MOVED),
    "seesr/data": ("seesr.training", "seesr.cli", "pipelines", "seesr.models", *MOVED),
    "dape": ("seesr.training.controlnet", "seesr.training.tgsr", "seesr.cli", "pipelines", *MOVED),
    "seesr/training": ("seesr.cli", *MOVED),
    "pipelines": ("seesr.training", "seesr.cli"),
}


@pytest.mark.parametrize("folder", sorted(LOWER_LAYERS))
def test_no_back_arrows(folder):
    forbidden = LOWER_LAYERS[folder]
    offences = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in sorted(imported_modules(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not offences, offences
