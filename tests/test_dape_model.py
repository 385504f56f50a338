import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_dape import TINY_DAPE_CONFIG, tiny_dape, tiny_pixel_values

from dape import DAPEModel, DAPEOutput, logits_to_tags, preprocess_images, tag_mask
from dape.backbone import relative_position_index, shifted_window_mask, stage_geometry
from dape.lora import lora_state_dict
from dape.preprocess import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]


# Output contract ------------------------------------------------------------------------------------------------


def test_output_shapes_and_dtypes():
    model = tiny_dape()
    out = model(tiny_pixel_values(3))
    assert isinstance(out, DAPEOutput)
    assert out.image_embeds.shape == (3, model.num_tokens, 16) == (3, 17, 16)
    assert out.logits.shape == (3, 12)
    assert out.image_embeds.dtype == out.logits.dtype == torch.float32


def test_output_without_logits_and_as_tuple():
    model = tiny_dape()
    x = tiny_pixel_values()
    full = model(x)
    embeds_only = model(x, output_logits=False)
    assert embeds_only.logits is None
    torch.testing.assert_close(embeds_only.image_embeds, full.image_embeds)
    as_tuple = model(x, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[1], full.logits)


def test_first_token_is_projected_mean_of_swin_tokens():
    model = tiny_dape().double()
    with torch.no_grad():
        tokens = model.image_encoder(tiny_pixel_values().double())
        embeds = model(tiny_pixel_values().double()).image_embeds
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1))
    torch.testing.assert_close(embeds, model.image_proj(tokens))


def test_batch_items_are_independent():
    model = tiny_dape()
    x = tiny_pixel_values(3)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
    torch.testing.assert_close(batched.image_embeds[1:2], single.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.logits[1:2], single.logits, rtol=1e-5, atol=1e-6)


def test_full_size_shapes_on_meta_device():
    names = [f"tag{i}" for i in range(4585)]
    with torch.device("meta"):
        model = DAPEModel(tag_names=names, tag_thresholds=[0.68] * 4585)
        out = model(torch.empty(1, 3, 384, 384))
    assert out.image_embeds.shape == (1, 145, 512)
    assert out.logits.shape == (1, 4585)
    assert model.image_encoder.num_features == 1536
    assert [(s, w) for s, w in stage_geometry(384, 4, (2, 2, 18, 2), 12)] == [(96, 12), (48, 12), (24, 12), (12, 12)]
    # the last stage (12x12 map, window 12) has no shifted blocks
    assert all(block.shift == 0 for block in model.image_encoder.layers[3].blocks)
    assert [block.shift for block in model.image_encoder.layers[2].blocks[:2]] == [0, 6]


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 3, 16, 16), torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32)],
    ids=["wrong-size", "no-batch", "one-channel"],
)
def test_forward_rejects_bad_pixel_values(bad):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_dape()(bad)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tag_thresholds": [0.5]}, "tag_thresholds"),
        ({"tag_thresholds": [0.5, 1.5]}, r"\[0, 1\]"),
        ({"tag_names": "ab"}, "list of strings"),
        ({"window_size": 3}, "window"),
        ({"num_heads": (3, 2)}, "divisible"),
    ],
)
def test_config_is_validated(kwargs, error):
    config = {**TINY_DAPE_CONFIG, "tag_names": ["a", "b"], "tag_thresholds": [0.5, 0.5], **kwargs}
    with pytest.raises((ValueError, TypeError), match=error):
        DAPEModel(**config)


# Swin details ---------------------------------------------------------------------------------------------------


def test_relative_position_index_and_shift_mask():
    index = relative_position_index(2)
    # (dy, dx) -> (dy + 1) * 3 + (dx + 1); token order (0,0), (0,1), (1,0), (1,1)
    assert index.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    mask = shifted_window_mask(side=4, window=2, shift=1)
    assert mask.shape == (4, 4, 4)
    assert torch.all(mask[0] == 0)  # top-left window lies inside one region
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(
        mask[3],
        torch.tensor([[0.0, -100, -100, -100], [-100, 0, -100, -100], [-100, -100, 0, -100], [-100, -100, -100, 0]]),
    )


def test_patch_merging_neighbour_order():
    model = tiny_dape()
    merge = model.image_encoder.layers[0].downsample
    x = torch.arange(8 * 8, dtype=torch.float32).repeat_interleave(8).view(1, 64, 8)  # token id in every channel
    captured = {}
    merge.norm.register_forward_hook(lambda module, args, out: captured.setdefault("x", args[0]))
    merge(x)
    first = captured["x"][0, 0].view(4, 8)[:, 0]  # the four neighbours of output token (0, 0)
    assert first.tolist() == [0.0, 8.0, 1.0, 9.0]  # (0,0), (1,0), (0,1), (1,1) in (row, col)


# Tags -----------------------------------------------------------------------------------------------------------


def _logits_for(probabilities):
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


def test_thresholds_are_per_class_and_strict():
    thresholds = [0.5, 0.9, 0.65]
    logits = _logits_for([[0.6, 0.6, 0.6], [0.95, 0.95, 0.95], [0.4, 0.91, 0.66]])
    assert tag_mask(logits, thresholds).tolist() == [[True, False, False], [True, True, True], [False, True, True]]
    # a probability equal to its (float32) threshold is not kept
    at = torch.tensor([[0.5, 0.9, 0.65]], dtype=torch.float32).double()
    assert not tag_mask(_logits_for(at.tolist()), thresholds).any()


def test_tag_string_format():
    names = ["blue sky", "cat", "dog", "tree"]
    logits = _logits_for([[0.9, 0.1, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]])
    assert logits_to_tags(logits, names, [0.5] * 4) == ["blue sky, dog, tree", "", "cat"]


def test_model_tags_use_config_names_and_thresholds():
    model = tiny_dape()
    x = tiny_pixel_values(4)
    logits = model(x).logits
    expected = [
        ", ".join(name for name, p, t in zip(model.config.tag_names, row, model.config.tag_thresholds) if p > t)
        for row in torch.sigmoid(logits).tolist()
    ]
    assert model.tags(logits=logits) == model.tags(x) == expected
    assert any(expected) and not all(len(e.split(", ")) == 12 for e in expected)  # the tiny model does tag
    with pytest.raises(ValueError, match="exactly one"):
        model.tags(x, logits=logits)


# Pre-processing -------------------------------------------------------------------------------------------------


def test_preprocess_constant_image_normalization():
    image = Image.new("RGB", (50, 20), (255, 0, 128))
    out = preprocess_images(image, image_size=32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    expected = [
        (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        -IMAGENET_MEAN[1] / IMAGENET_STD[1],
        (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ]
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor(expected))


def test_preprocess_matches_to_tensor_resize_normalize_without_antialias():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (70, 45, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    resized = F.interpolate(tensor[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    expected = (resized - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    from_pil = preprocess_images(Image.fromarray(array), image_size=32)
    torch.testing.assert_close(from_pil, expected)
    torch.testing.assert_close(preprocess_images(tensor, image_size=32), expected)
    torch.testing.assert_close(preprocess_images(torch.from_numpy(array).permute(2, 0, 1), image_size=32), expected)
    assert not torch.allclose(preprocess_images(tensor, image_size=32, antialias=True), expected)


def test_preprocess_batches_mixed_inputs():
    images = [Image.new("RGB", (10, 30), (10, 20, 30)), torch.rand(3, 64, 48), Image.new("L", (8, 8), 200)]
    out = preprocess_images(images, image_size=32, dtype=torch.float64)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float64
    assert preprocess_images(torch.rand(2, 3, 40, 40), image_size=32).shape == (2, 3, 32, 32)
    assert tiny_dape().preprocess(images).shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    "bad", [[], torch.rand(1, 32, 32), torch.zeros(3, 8, 8, dtype=torch.int64), "image.png"], ids=str
)
def test_preprocess_rejects_bad_input(bad):
    with pytest.raises((TypeError, ValueError)):
        preprocess_images(bad, image_size=32)


# Save / load ----------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = tiny_dape(seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DAPEModel.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config.tag_names == model.config.tag_names
    assert loaded.config.tag_thresholds == model.config.tag_thresholds
    x = tiny_pixel_values()
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    torch.testing.assert_close(actual.image_embeds, expected.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    assert loaded.tags(logits=actual.logits) == model.tags(logits=expected.logits)


def test_loads_as_a_diffusers_pipeline_component(tmp_path):
    from diffusers import DiffusionPipeline

    class TagPipeline(DiffusionPipeline):
        def __init__(self, prompt_extractor: DAPEModel):
            super().__init__()
            self.register_modules(prompt_extractor=prompt_extractor)

    TagPipeline(tiny_dape(seed=1)).save_pretrained(tmp_path)
    assert '"dape.model"' in (tmp_path / "model_index.json").read_text()
    pipe = TagPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.prompt_extractor, DAPEModel)
    torch.testing.assert_close(
        pipe.prompt_extractor(tiny_pixel_values()).logits, tiny_dape(seed=1)(tiny_pixel_values()).logits
    )


# LoRA -----------------------------------------------------------------------------------------------------------


def _randomize_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_lora_placement_and_trainable_parameters():
    model = tiny_dape()
    model.add_lora()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    modules = {name.split(".lora_")[0] for name in trainable}
    swin = {
        f"image_encoder.layers.{s}.blocks.{b}.attn.{n}" for s in range(2) for b in range(2) for n in ("query", "value")
    }
    head = {f"tagging_head.layers.{i}.{n}" for i in range(2) for n in ("query", "key")}
    assert modules == swin | head
    assert all(name.endswith(("lora_A.default.weight", "lora_B.default.weight")) for name in trainable)
    query = model.image_encoder.layers[1].blocks[0].attn.query
    assert query.r["default"] == 8 and query.scaling["default"] == pytest.approx(1 / 8)
    assert model.tagging_head.layers[0].key.lora_A["default"].weight.shape == (8, 16)  # keys read 16-wide tokens
    assert set(lora_state_dict(model)) == trainable


def test_lora_starts_as_identity_and_merge_equals_unmerged():
    base = tiny_dape().double()
    x = tiny_pixel_values(2).double()
    with torch.no_grad():
        reference = base(x)
        base.add_lora()
        initial = base(x)
        _randomize_lora(base)
        unmerged = base(x)
        base.merge_lora()
        merged = base(x)
    torch.testing.assert_close(initial.logits, reference.logits, rtol=0, atol=0)
    assert not torch.allclose(unmerged.logits, reference.logits)
    assert not torch.allclose(unmerged.image_embeds, reference.image_embeds)
    torch.testing.assert_close(merged.image_embeds, unmerged.image_embeds, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged.logits, unmerged.logits, rtol=1e-10, atol=1e-10)
    assert not base.has_lora
    assert set(base.state_dict()) == set(tiny_dape().state_dict())


def test_save_refuses_unmerged_lora(tmp_path):
    model = tiny_dape()
    model.add_lora()
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp_path)
    model.merge_lora()
    model.save_pretrained(tmp_path)
    DAPEModel.from_pretrained(tmp_path)


def test_training_step_updates_only_lora():
    model = tiny_dape()
    model.add_lora()
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(tiny_pixel_values())
    loss = out.image_embeds.square().mean() + out.logits.sigmoid().mean()
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)


# Import cost ----------------------------------------------------------------------------------------------------


def test_cli_import_does_not_load_torch():
    code = "import sys, dape, dape.command; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_bicubic_training_preprocess_matches_seesr_training():
    """SeeSR's training: F.interpolate(bicubic) of the upscaled LQ to DAPE's size, clamp, ImageNet normalisation."""
    from dape.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_images

    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    expected = (expected - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess_images(images, 32, mode="bicubic"), expected, rtol=0, atol=0)
    assert not torch.equal(preprocess_images(images, 32), expected)
    with pytest.raises(ValueError, match="mode"):
        preprocess_images(images, 32, mode="nearest")
