"""Presets (quality, fast, turbo, onestep), stored sampling defaults, the exact speed-ups of the multi-step path."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import lq_image, tiny_pipeline

from pipelines import SeeSRPipeline
from pipelines.presets import PRESETS, apply_preset, preset_table
from seesr.cli import main


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(
        lq_image(24, 24, seed=5),
        process_size=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_control_embedding_cache_is_bitwise_and_once_per_tile(pipe):
    calls = []
    handle = pipe.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: calls.append(1))
    try:
        for kwargs in ({}, {"latent_tile_size": 8, "latent_tile_overlap": 4}, {"guidance_scale": 1.0}):
            pipe.cache_control_embedding = False
            calls.clear()
            before = _run(pipe, **kwargs)
            uncached_calls = len(calls)
            pipe.cache_control_embedding = True
            calls.clear()
            after = _run(pipe, **kwargs)
            np.testing.assert_array_equal(after, before)  # bitwise: the default results do not change
            tiles = 4 if "latent_tile_size" in kwargs else 1
            assert uncached_calls == 3 * tiles and len(calls) == tiles  # once per tile, not per step
            if tiles > 1:
                before_tiled = before
        # A budget below one tile's embedding: every tile is recomputed per step, still the same result.
        pipe.control_embedding_cache_mib = 1e-3
        calls.clear()
        np.testing.assert_array_equal(_run(pipe, latent_tile_size=8, latent_tile_overlap=4), before_tiled)
        assert len(calls) == 3 * 4
    finally:
        handle.remove()
        pipe.cache_control_embedding = True
        pipe.control_embedding_cache_mib = 64


def test_quality_and_fast_presets(pipe):
    original = pipe.scheduler
    try:
        kwargs = apply_preset(pipe, "quality")
        assert kwargs == {"num_inference_steps": 50, "guidance_scale": 5.5}
        assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.unet.dtype == torch.float32
        kwargs = apply_preset(pipe, "fast")
        assert kwargs == {"num_inference_steps": 10, "guidance_scale": 5.5}
        assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert pipe.unet.dtype == pipe.controlnet.dtype == pipe.vae.dtype == torch.bfloat16  # bf16 on CPU
        out = _run(pipe, **{**kwargs, "num_inference_steps": 2})
        assert out.shape == (1, 96, 96, 3) and np.isfinite(out).all()
    finally:
        pipe.to(dtype=torch.float32)
        pipe.scheduler = original


def test_presets_refuse_the_wrong_folder(pipe):
    with pytest.raises(ValueError, match=r"preset turbo: .* seesr folder, .*seesr-turbo folder .*--sd-turbo"):
        apply_preset(pipe, "turbo")
    with pytest.raises(ValueError, match=r"preset onestep: .*osediff folder .*--osediff"):
        apply_preset(pipe, "onestep")
    turbo = SeeSRPipeline(**pipe.components, model_kind="seesr-turbo", sampling_defaults={"num_inference_steps": 2})
    with pytest.raises(ValueError, match=r"preset quality: .* seesr-turbo folder"):
        apply_preset(turbo, "quality")
    assert apply_preset(turbo, "turbo") == {}  # the folder's own scheduler and stored defaults
    with pytest.raises(ValueError, match="preset: expected one of"):
        apply_preset(pipe, "fastest")


def test_old_folders_keep_todays_defaults(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["sampling_defaults"] == {} and index["model_kind"] == "seesr"
    for key in ("sampling_defaults", "model_kind"):  # a folder written before these existed
        del index[key]
    index_path.write_text(json.dumps(index))
    loaded = SeeSRPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.model_kind == "seesr"
    assert [loaded.sampling_default(k) for k in ("num_inference_steps", "guidance_scale", "latent_tile_overlap")] == [
        50,
        5.5,
        16,
    ]
    assert loaded.sampling_default("num_inference_steps", 7) == 7
    with pytest.raises(ValueError, match="sampling_defaults: unknown keys"):
        SeeSRPipeline(**pipe.components, sampling_defaults={"steps": 2})


def test_cli_preset_and_scheduler(pipe, tmp_path, caplog):
    pipe.save_pretrained(tmp_path / "model")
    lq_image(16, 16).save(tmp_path / "in.png")
    base = ["upscale", str(tmp_path / "in.png"), "--model", str(tmp_path / "model"), "--process-size", "64"]
    with caplog.at_level(logging.ERROR):
        assert main([*base, "-o", str(tmp_path / "out1"), "--preset", "turbo"]) == 1
    assert "preset turbo" in caplog.text and "--sd-turbo" in caplog.text
    assert main([*base, "-o", str(tmp_path / "out2"), "--preset", "fast", "--steps", "2"]) == 0
    assert (tmp_path / "out2" / "in.png").exists()
    assert main([*base, "-o", str(tmp_path / "out3"), "--scheduler", "heun", "--steps", "2"]) == 0
    assert (tmp_path / "out3" / "in.png").exists()


def test_help_shows_the_preset_table():
    table = preset_table()
    for name in PRESETS:
        assert name in table
    assert "steps" in table and "guidance" in table and "speed" in table


def test_help_speeds_are_the_readmes_measured_figures():
    """--help's speed column shows the README preset table's measured ratios (no placeholders)."""
    from pipelines.presets import MEASURED_SPEEDUP

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in PRESETS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        speed = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert speed.split()[0] == MEASURED_SPEEDUP[name].split()[0], (name, speed, MEASURED_SPEEDUP[name])
        assert MEASURED_SPEEDUP[name].split()[0] in preset_table()
