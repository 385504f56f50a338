"""SeeSRPipeline end to end on tiny random models (2 DDPM steps)."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from tiny import SD2_SCHEDULER, lq_image, tiny_pipeline

from pipelines import SeeSRPipeline
from pipelines.pipeline_seesr import preprocess_lq
from pipelines.tiling import tile_grid
from seesr.color import adain_color_fix


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def run(pipe, image=None, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("process_size", 64)
    kwargs.setdefault("output_type", "np")
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    return pipe(image if image is not None else lq_image(16, 16), generator=generator, **kwargs)


def test_output_size_and_prompt(pipe):
    out = run(pipe, prompt="a dog", output_type="pil")
    assert out.images[0].size == (64, 64)
    assert out.prompts == ["a dog,clean, high-resolution, 8k"]
    # The small-input rule: 10x12 < process_size // upscale = 16 -> short side resized to 16 first.
    out = run(pipe, lq_image(10, 12), output_type="pil")
    assert out.images[0].size == (40, 48)
    out = run(pipe, lq_image(16, 16), upscale=2.5, output_type="pt")
    assert out.images.shape == (1, 3, 40, 40)


def test_preprocess_follows_original():
    image = lq_image(10, 12)
    cond, size = preprocess_lq(image, 4, 64)
    assert size == (40, 48)
    expected = image.resize((16, 19), PIL.Image.BICUBIC).resize((64, 76), PIL.Image.BICUBIC).resize((64, 72))
    assert torch.equal(cond, torch.from_numpy(np.asarray(expected, dtype=np.float32).copy()).permute(2, 0, 1) / 255)


def test_determinism_under_generator(pipe):
    a, b, c = (run(pipe, seed=s).images for s in (0, 0, 1))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_batch_equals_single_runs(pipe):
    images = [lq_image(16, 16, seed=1), lq_image(16, 16, seed=2)]
    generators = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = run(pipe, images, generator=generators, prompt=["one", "two"]).images
    for i in range(2):
        single = run(pipe, images[i], generator=torch.Generator().manual_seed(10 + i), prompt=["one", "two"][i]).images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-5)


def test_num_images_per_prompt(pipe):
    out = run(pipe, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    assert out.images.shape == (2, 64, 64, 3) and np.abs(out.images[0] - out.images[1]).max() > 1e-4


@pytest.mark.parametrize("color_fix", ["adain", "wavelet"])
def test_uint8_lq_is_bitwise_the_float_lq(pipe, monkeypatch, color_fix):
    """PIL inputs keep the upscaled LQ as uint8 (a quarter of float32's memory) and read it as value / 255 per
    latent tile (ControlNet), per VAE window (encoder) and once for the colour fix: bitwise the float32 batch."""
    kinds = []
    prepare = SeeSRPipeline.prepare_lq

    def as_float(self, *args):
        lq = prepare(self, *args)
        kinds.append(lq.pixels.dtype)
        lq.pixels = lq.unit(torch.float32)
        return lq

    image = lq_image(24, 20, seed=6)
    kwargs = {"latent_tile_size": 8, "latent_tile_overlap": 4, "vae_tile_size": 64, "color_fix": color_fix}
    kept = run(pipe, image, output_type="pil", **kwargs).images[0]
    monkeypatch.setattr(SeeSRPipeline, "prepare_lq", as_float)
    floats = run(pipe, image, output_type="pil", **kwargs).images[0]
    assert kinds == [torch.uint8]
    assert np.array_equal(np.asarray(kept), np.asarray(floats))


def test_tiled_close_to_untiled(pipe):
    image = lq_image(24, 24, seed=5)
    untiled = run(pipe, image, latent_tile_size=None, color_fix=None).images
    tiled = run(pipe, image, latent_tile_size=8, latent_tile_overlap=4, color_fix=None).images
    other_seed = run(pipe, image, latent_tile_size=None, color_fix=None, seed=9).images
    assert tiled.shape == untiled.shape == (1, 96, 96, 3)
    assert np.abs(tiled - untiled).mean() < 0.5 * np.abs(other_seed - untiled).mean()
    vae_tiled = run(pipe, image, latent_tile_size=None, color_fix=None, vae_tile_size=64).images
    assert np.abs(vae_tiled - untiled).mean() < 0.5 * np.abs(other_seed - untiled).mean()


def test_start_points_and_callback(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append(int(t))
        return {"latents": tensors["latents"] * 0}

    out = run(pipe, callback_on_step_end=callback, output_type="latent")
    assert seen == [501, 1] and torch.count_nonzero(out.images) == 0
    lr = run(pipe, output_type="latent").images
    first = run(pipe, output_type="latent", start_timestep=None).images
    noise = run(pipe, output_type="latent", start_point="noise").images
    assert lr.shape == noise.shape == (1, 4, 8, 8)
    assert not torch.allclose(lr, first) and not torch.allclose(lr, noise)


def test_image_embeds_feed_rca(pipe):
    embeds = torch.randn(1, 5, 512, generator=torch.Generator().manual_seed(0))
    with_tokens = run(pipe, image_embeds=embeds, color_fix=None).images
    without = run(pipe, color_fix=None).images
    assert np.abs(with_tokens - without).max() > 1e-4


def test_guidance_and_schedulers(pipe):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    no_cfg = run(pipe, guidance_scale=1.0).images
    cfg = run(pipe, guidance_scale=7.0).images
    assert np.abs(no_cfg - cfg).max() > 1e-4
    original = pipe.scheduler
    try:
        for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
            pipe.scheduler = cls.from_config(original.config)
            out = run(pipe, num_inference_steps=3).images
            assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    finally:
        pipe.scheduler = original


def test_adain_pil_path_matches_original_rounding(pipe):
    """pil output = round to 8 bits, AdaIN against the condition, truncate to 8 bits (the original's steps)."""
    latents = run(pipe, output_type="latent").images
    decoded = pipe.decode_latents(latents, None, False)
    cond, _ = preprocess_lq(lq_image(16, 16), 4, 64)
    rounded = (decoded * 255).round() / 255
    expected = (adain_color_fix(rounded, cond[None]) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    out = run(pipe, output_type="pil").images[0]
    assert np.array_equal(np.asarray(out), expected)


BAD_INPUTS = [
    ({"image": []}, "image"),
    ({"image": "x.png"}, "image"),
    ({"image": torch.rand(1, 16, 16)}, "image"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"upscale": 0.5}, "upscale"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"start_point": "middle"}, "start_point"),
    ({"start_timestep": 1000}, "start_timestep"),
    ({"color_fix": "gray"}, "color_fix"),
    ({"output_type": "jpg"}, "output_type"),
    ({"latent_tile_size": 4}, "latent_tile_size"),
    ({"latent_tile_size": 16, "latent_tile_overlap": 16}, "latent_tile_overlap"),
    ({"vae_tile_size": 8}, "vae_tile_size"),
    ({"image_embeds": torch.randn(1, 5, 7)}, "image_embeds"),
    ({"generator": [torch.Generator(), torch.Generator()]}, "generator"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),
    ({"image": [lq_image(16, 16), lq_image(24, 16)]}, "image"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_check_inputs_errors(pipe, kwargs, name):
    kwargs = dict(kwargs)
    image = kwargs.pop("image", lq_image(16, 16))
    with pytest.raises((ValueError, TypeError), match=name):
        pipe(image, num_inference_steps=1, process_size=64, **kwargs)


def test_stock_unet_is_refused(pipe):
    from diffusers import UNet2DConditionModel

    stock = UNet2DConditionModel.from_config({k: v for k, v in pipe.unet.config.items() if "image_" not in k})
    components = {**pipe.components, "unet": stock}
    with pytest.raises(TypeError, match="silently drops the RCA weights"):
        SeeSRPipeline(**components)


@pytest.mark.parametrize("with_dape", [False, True], ids=["no-dape", "dape"])
def test_save_load_round_trip_in_fresh_process(pipe, tmp_path, with_dape):
    """Both loaders, in a fresh interpreter that imported nothing of ours, give identical output."""
    if with_dape:
        from tiny_dape import tiny_dape

        pipe = tiny_pipeline(seed=0, prompt_extractor=tiny_dape())
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["seesr.models.unet", "SeeSRUNet2DConditionModel"]
    assert index["scheduler"][1] == "DDPMScheduler"
    assert index["prompt_extractor"] == (["dape.model", "DAPEModel"] if with_dape else [None, None])
    expected = run(pipe).images
    loaded = SeeSRPipeline.from_pretrained(tmp_path / "pipe")
    np.testing.assert_array_equal(run(loaded).images, expected)
    script = (
        "import sys, numpy as np, torch\n"
        "assert not any(m.split('.')[0] in ('seesr', 'dape', 'pipelines') for m in sys.modules)\n"
        "from diffusers import DiffusionPipeline\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from tiny import lq_image\n"
        "def run(pipe):\n"
        "    return pipe(lq_image(16, 16), generator=torch.Generator().manual_seed(0), num_inference_steps=2,\n"
        "                process_size=64, output_type='np').images\n"
        "if sys.argv[4] == 'diffusers':\n"
        "    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "else:\n"
        "    from pipelines import SeeSRPipeline\n"
        "    pipe = SeeSRPipeline.from_pretrained(sys.argv[1])\n"
        "assert type(pipe).__name__ == 'SeeSRPipeline', type(pipe)\n"
        "np.save(sys.argv[2], run(pipe))\n"
    )
    threads = str(torch.get_num_threads())  # same reduction order as this process: outputs must be identical
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": threads}
    tests_dir = str(__import__("tiny").FIXTURES.parent)
    for loader in ("diffusers", "seesr") if with_dape else ("diffusers",):
        out = tmp_path / f"{loader}.npy"
        command = [sys.executable, "-c", script, str(tmp_path / "pipe"), str(out), tests_dir, loader]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        np.testing.assert_array_equal(np.load(out), expected)


def test_np_outputs_of_different_original_sizes(pipe):
    """25x31 and 24x30 both pre-process to 96x120 but must come back at 100x124 and 96x120."""
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = run(pipe, [lq_image(25, 31), lq_image(24, 30)], generator=generators).images
    assert [a.shape for a in out] == [(124, 100, 3), (120, 96, 3)]


def test_scheduler_config_is_sd2():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SD2_SCHEDULER)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1


def test_text_and_dape_encoded_once_per_image_not_per_step_or_tile():
    from tiny_dape import tiny_dape

    from seesr.conditioning import dape_condition

    pipe = tiny_pipeline(seed=0, prompt_extractor=tiny_dape())
    calls = {"text_encoder": 0, "prompt_extractor": 0, "unet": 0}
    for name in calls:
        getattr(pipe, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    out = run(
        pipe,
        [lq_image(24, 24, seed=1), lq_image(24, 24, seed=2)],
        latent_tile_size=8,
        latent_tile_overlap=4,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    )
    assert calls["text_encoder"] == 1 and calls["prompt_extractor"] == 1  # one batched call each
    assert calls["unet"] == 3 * len(tile_grid(12, 12, 8, 4))  # per step and tile
    tags, _ = dape_condition(pipe.prompt_extractor, [lq_image(24, 24, seed=1), lq_image(24, 24, seed=2)])
    assert out.prompts == [f"{t}, ,clean, high-resolution, 8k" for t in tags]  # the DAPE tags start the prompt
