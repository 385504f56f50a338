"""Pipeline folders saved before the reorganisation by role (issue #11) still load and give the same output.

``tests/fixtures/old_layout`` was written by the pre-reorganisation code (its ``model_index.json`` names
``seesr.unet``, ``seesr.controlnet``, ``dape.model`` and ``seesr.tgsr``; its loader files import ``pipelines...``),
together with the outputs that code produced; see ``tests/fixtures/old_layout/README.md``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import FIXTURES, lq_image

OLD = FIXTURES / "old_layout"


def run_seesr(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        lq_image(16, 16),
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=2,
        process_size=64,
        output_type="np",
    ).images


def run_tgsr(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0))
    return pipe(image, "a red bird", upscale=2, output_type="pt").images.numpy()


def test_fixture_names_the_old_module_paths():
    seesr_index = json.loads((OLD / "seesr_pipeline" / "model_index.json").read_text())
    assert seesr_index["unet"][0] == "seesr.unet" and seesr_index["controlnet"][0] == "seesr.controlnet"
    assert seesr_index["prompt_extractor"][0] == "dape.model"
    assert json.loads((OLD / "tgsr_pipeline" / "model_index.json").read_text())["model"][0] == "seesr.tgsr"


@pytest.mark.parametrize("loader", ["class", "diffusers"])
@pytest.mark.parametrize("kind", ["seesr", "tgsr"])
def test_old_folder_loads_and_matches(kind, loader):
    from diffusers import DiffusionPipeline

    import pipelines

    folder = OLD / f"{kind}_pipeline"
    name, run = ("SeeSRPipeline", run_seesr) if kind == "seesr" else ("TGSRPipeline", run_tgsr)
    if loader == "class":
        pipe = getattr(pipelines, name).from_pretrained(folder)
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__name__ == name
    np.testing.assert_array_equal(run(pipe), np.load(OLD / f"{kind}_expected.npy"))
