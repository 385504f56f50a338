"""TGSRPipeline: sizes, output types, batching, tiling, input checks, save/load (copied and referenced encoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tgsr_tiny import tiny_bert_tokenizer, tiny_model, tiny_text_encoder

from pipelines.pipeline_tgsr import TGSRPipeline, blend_weights
from pipelines.tiling import tile_starts
from seesr.models.tgsr import DEFAULT_TEXT_ENCODER


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipeline = TGSRPipeline(tiny_model(), tiny_text_encoder(), tiny_bert_tokenizer(tmp_path_factory.mktemp("tok")))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("upscale", [2, 4, 8])
def test_output_size_is_scale_times_input(pipe, upscale):
    out = pipe(random_image(12, 20), "a red bird", upscale=upscale)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (20 * upscale, 12 * upscale)
    assert out.prompts == ["a red bird"]


def test_output_types_agree(pipe):
    image = random_image(10, 10)
    pil = pipe(image, "a cat", upscale=2).images[0]
    array = pipe(image, "a cat", upscale=2, output_type="np").images
    tensor = pipe(image, "a cat", upscale=2, output_type="pt").images
    assert array.shape == (1, 20, 20, 3) and tensor.shape == (1, 3, 20, 20)
    assert 0 <= array.min() and array.max() <= 1
    np.testing.assert_allclose(array[0], tensor[0].permute(1, 2, 0).numpy())
    assert np.abs(np.asarray(pil, dtype=np.float32) / 255 - array[0]).max() <= 0.5 / 255 + 1e-6


def test_batch_equals_single_runs_and_mixed_sizes_give_lists(pipe):
    first, second = random_image(12, 12, seed=1), random_image(12, 12, seed=2)
    batch = pipe([first, second], ["a red bird", "a cat with green eyes"], output_type="pt").images
    single = [pipe(image, prompt, output_type="pt").images[0] for image, prompt in
              [(first, "a red bird"), (second, "a cat with green eyes")]]  # fmt: skip
    torch.testing.assert_close(batch[0], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], single[1], atol=1e-5, rtol=1e-5)
    mixed = pipe([first, random_image(8, 16)], "a cat", upscale=2, output_type="np").images
    assert isinstance(mixed, list) and mixed[0].shape == (24, 24, 3) and mixed[1].shape == (16, 32, 3)


def test_prompt_changes_the_output(pipe):
    image = random_image(12, 12)
    bird = pipe(image, "a red bird on a branch", output_type="pt").images
    empty = pipe(image, "", output_type="pt").images
    assert (bird - empty).abs().max() > 1e-4


def test_tile_starts_cover_with_overlap():
    for length, tile, overlap in [(100, 32, 8), (33, 32, 8), (64, 32, 0), (500, 256, 32)]:
        starts = tile_starts(length, tile, overlap, spread=True)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    assert tile_starts(20, 32, 8, spread=True) == [0]
    weights = blend_weights(16, 16, ramp=4)
    assert weights.min() > 0 and weights[8, 8] == 1 and weights[0, 0] < weights[2, 2]


def test_tiling_matches_whole_image(pipe):
    """Tiles with a generous overlap blend back to (nearly) the whole-image result, without seams."""
    image = random_image(40, 40)
    whole = pipe(image, "a cat", upscale=2, output_type="pt").images
    tiled = pipe(image, "a cat", upscale=2, tile_size=24, tile_overlap=8, output_type="pt").images
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.01


def test_text_is_encoded_once_per_call_not_per_tile(pipe):
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        pipe([random_image(40, 40), random_image(40, 40, seed=3)], "a cat", upscale=2, tile_size=16, tile_overlap=4)
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"upscale": 3}, ValueError, "upscale"),
        ({"upscale": 16}, ValueError, "upscale"),
        ({"tile_size": 8}, ValueError, "tile_size"),
        ({"tile_size": 32, "tile_overlap": 16}, ValueError, "tile_overlap"),
        ({"output_type": "latent"}, ValueError, "output_type"),
        ({"prompt": ["a", "b"]}, ValueError, "prompt"),
        ({"prompt": [3]}, TypeError, "prompt"),
        ({"image": "photo.png"}, TypeError, "image"),
        ({"image": np.zeros((8, 8))}, ValueError, "image"),
        ({"image": torch.zeros(1, 8, 8)}, ValueError, "image"),
        ({"image": []}, ValueError, "image"),
    ],
)
def test_check_inputs_raises(pipe, kwargs, error, match):
    kwargs = {"image": random_image(8, 8), **kwargs}
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_save_and_load_with_a_copied_text_encoder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert {"model", "text_encoder", "tokenizer"} <= {p.name for p in tmp_path.iterdir()}
    loaded = TGSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    image = random_image(10, 10)
    torch.testing.assert_close(
        loaded(image, "a cat", output_type="pt").images, pipe(image, "a cat", output_type="pt").images
    )


def test_save_with_a_package_reference_does_not_copy_the_encoder(tmp_path):
    from seesr.models.tgsr import load_text_encoder

    text_encoder, tokenizer = load_text_encoder(DEFAULT_TEXT_ENCODER)
    pipeline = TGSRPipeline(
        tiny_model(text_dim=384), text_encoder, tokenizer, text_encoder_source=DEFAULT_TEXT_ENCODER
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model_index.json", "pipeline_tgsr.py"]
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder_source"] == DEFAULT_TEXT_ENCODER
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert size < 2_000_000
    loaded = TGSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.text_encoder).__name__ == "BertModel"
    assert loaded.text_encoder.config.hidden_size == 384 and not any(
        p.requires_grad for p in loaded.text_encoder.parameters()
    )
    image = random_image(10, 10)
    torch.testing.assert_close(
        loaded(image, "a red bird", output_type="pt").images, pipeline(image, "a red bird", output_type="pt").images
    )


def test_bundled_default_beats_bicubic_on_the_example():
    """The committed weights load offline (text encoder from its package) and beat bicubic on the held-out demo."""
    from seesr.data.captioned import _package_photo
    from seesr.metrics import psnr
    from seesr.models.tgsr import default_model_path

    root = default_model_path().parents[1]
    pipeline = TGSRPipeline.from_pretrained(default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    lq = Image.open(root / "examples" / "astronaut.png").convert("RGB")
    prompt = (root / "examples" / "astronaut.txt").read_text(encoding="utf-8").strip()
    output = pipeline(lq, prompt, upscale=4).images[0]
    gt = np.asarray(Image.open(_package_photo("skimage:astronaut.png")).convert("RGB"))
    assert output.size == (512, 512)
    bicubic = np.asarray(lq.resize((512, 512), Image.BICUBIC))
    assert psnr(np.asarray(output), gt, 4) > psnr(bicubic, gt, 4) + 0.3


def test_tiny_end_to_end_expected_slice(pipe):
    """Regenerate on purpose only (seeded tiny model, tiny BERT, fixed input)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    out = pipe(image, "a red bird on a branch", upscale=4, output_type="pt").images
    expected = torch.tensor([0.2300, 0.4236, 0.2598, 0.6472, 0.7299, 0.8417, 0.9897, 0.9913, 0.7738])
    torch.testing.assert_close(out[0, :, 20, 20:23].flatten(), expected, atol=2e-3, rtol=0)


def test_bundled_default_loads_through_diffusers_in_a_fresh_process(tmp_path):
    """`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` without importing seesr first, offline."""
    import subprocess
    import sys

    from seesr.models.tgsr import default_model_path

    script = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert type(pipe).__name__ == 'TGSRPipeline', type(pipe)\n"
        "assert type(pipe.text_encoder).__name__ == 'BertModel'\n"
        "print(pipe(torch.rand(3, 12, 10), 'a cat', upscale=2, output_type='pt').images.shape)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(default_model_path())], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([1, 3, 24, 20])" in result.stdout
