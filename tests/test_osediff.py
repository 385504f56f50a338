"""OSEDiff one-step: LoRA surgery, osediff.pkl reading, OSEDiffPipeline against a re-statement of the original."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import lq_image, tiny_vae, write_sd2_folder
from tiny_dape import tiny_dape
from tiny_osediff import original_unet_lists, original_vae_list, reference_osediff, write_osediff_pkl

from pipelines import OSEDiffPipeline
from pipelines.pipeline_osediff import preprocess_osediff
from seesr.cli.convert_osediff import convert_osediff
from seesr.models.onestep import (
    OSEDiffCheckpointError,
    add_unet_lora,
    add_vae_lora,
    has_lora,
    load_osediff_checkpoint,
    onestep_x0,
    osediff_checkpoint,
    read_osediff_checkpoint,
    set_trainable,
    trainable_parameter_names,
    unet_lora_target_modules,
    vae_lora_target_modules,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny SD2 folder, an osediff.pkl for it in the released layout, and the converted pipeline folder."""
    root = tmp_path_factory.mktemp("osediff")
    write_sd2_folder(root / "sd2")
    pkl = write_osediff_pkl(root / "osediff.pkl", root / "sd2")
    convert_osediff(str(root / "sd2"), root / "osediff.pkl", root / "pipe")
    return root, pkl


@pytest.fixture(scope="module")
def pipe(released):
    root, _ = released
    return OSEDiffPipeline.from_pretrained(root / "pipe")


def sd_models(root):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(root / "sd2" / "unet"), AutoencoderKL.from_pretrained(
        root / "sd2" / "vae"
    )


# LoRA surgery ----------------------------------------------------------------------------------------------------


def test_target_modules_are_the_originals(released):
    unet, vae = sd_models(released[0])
    encoder, decoder, others = original_unet_lists(unet)
    assert unet_lora_target_modules(unet) == {
        "default_encoder": encoder,
        "default_decoder": decoder,
        "default_others": others,
    }
    assert vae_lora_target_modules(vae) == original_vae_list(vae)
    assert "conv_in" in encoder and "conv_out" in decoder and all(n.startswith("mid_block") for n in others)
    vae_targets = vae_lora_target_modules(vae)
    assert vae_targets.count("quant_conv") == 10 and "post_quant_conv" not in vae_targets
    assert not any(n.startswith("decoder.") for n in vae_targets)
    # Adding adapters afterwards does not change the lists (peft's base_layer names are folded back).
    add_unet_lora(unet)
    add_vae_lora(vae)
    assert unet_lora_target_modules(unet)["default_encoder"] == encoder and vae_lora_target_modules(vae) == vae_targets


def test_lora_rank_scale_and_trainable_set(released):
    from peft.tuners.lora import LoraLayer

    unet, vae = sd_models(released[0])
    add_unet_lora(unet)
    add_vae_lora(vae)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    assert layers and all(set(m.scaling.values()) == {2.0} and set(m.r.values()) == {4} for m in layers)
    assert all(set(m.active_adapters) >= set(m.lora_A) for m in layers)
    assert tuple(unet.conv_in.lora_A["default_encoder"].weight.shape) == (4, 4, 3, 3)
    assert tuple(unet.conv_in.lora_B["default_encoder"].weight.shape) == (32, 4, 1, 1)
    trainable = trainable_parameter_names(unet)
    assert {"conv_in.base_layer.weight", "conv_in.base_layer.bias"} <= set(trainable)
    assert all("lora" in n or "conv_in" in n for n in trainable)
    assert not any("decoder" in n for n in trainable_parameter_names(vae))
    assert set_trainable(unet) == trainable
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(trainable)


def test_x0_is_the_ddpm_step_at_999():
    from diffusers import DDPMScheduler
    from tiny import SD2_SCHEDULER

    scheduler = DDPMScheduler.from_config(SD2_SCHEDULER)
    scheduler.set_timesteps(timesteps=[999])  # = set_timesteps(1) on diffusers 0.25 (prev_t = -1)
    generator = torch.Generator().manual_seed(0)
    sample, eps = (torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    stepped = scheduler.step(eps, torch.tensor([999]), sample, generator=generator).prev_sample
    x0 = onestep_x0(sample, eps, scheduler.alphas_cumprod)
    assert x0.dtype == torch.float64 and (x0 - stepped).abs().max() < 1e-9  # the step adds 1e-10 x noise
    half = onestep_x0(sample.half(), eps.half(), scheduler.alphas_cumprod)
    assert half.dtype == torch.float32  # float32 coefficients promote fp16, as the original's (1,) tensors do


# The checkpoint --------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(released):
    root, pkl = released
    checkpoint = read_osediff_checkpoint(root / "osediff.pkl")
    unet, vae = sd_models(root)
    load_osediff_checkpoint(checkpoint, unet, vae)
    again = osediff_checkpoint(unet, vae).to_dict()
    assert list(again) == list(pkl)
    for key in list(pkl)[:6]:
        assert again[key] == pkl[key], key
    for key in ("state_dict_unet", "state_dict_vae"):
        assert again[key].keys() == pkl[key].keys()
        assert all(torch.equal(again[key][k], v) for k, v in pkl[key].items())


def _broken(pkl: dict, case: str) -> tuple[dict, str]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in pkl.items()}
    if case == "missing tensor":
        del data["state_dict_unet"]["conv_in.base_layer.bias"]
        return data, "conv_in.base_layer.bias"
    if case == "unexpected tensor":
        data["state_dict_vae"]["decoder.conv_in.lora_A.default_encoder.weight"] = torch.zeros(4, 8, 3, 3)
        return data, "decoder.conv_in.lora_A"
    if case == "wrong shape":
        key = "conv_in.lora_A.default_encoder.weight"
        data["state_dict_unet"][key] = torch.zeros(5, 4, 3, 3)
        return data, key
    if case == "missing entry":
        del data["rank_vae"]
        return data, "rank_vae"
    data["step"] = 500  # unexpected entry
    return data, "step"


@pytest.mark.parametrize("case", ["missing tensor", "unexpected tensor", "wrong shape", "missing entry", "extra"])
def test_checkpoint_is_strict(released, tmp_path, case):
    root, pkl = released
    data, named = _broken(pkl, case)
    torch.save(data, tmp_path / "bad.pkl")
    with pytest.raises(OSEDiffCheckpointError, match=named.replace(".", r"\.")):
        load_osediff_checkpoint(tmp_path / "bad.pkl", *sd_models(root))


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_checkpoint_is_loaded_safely(tmp_path, capsys):
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"rank_unet": _Payload()}, handle)
    with pytest.raises(OSEDiffCheckpointError, match="not a loadable OSEDiff checkpoint"):
        read_osediff_checkpoint(tmp_path / "evil.pkl")
    assert "unpickled" not in capsys.readouterr().out


# The pipeline ----------------------------------------------------------------------------------------------------


def _np(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def test_matches_the_original_in_float64(released):
    root, _ = released
    dape = tiny_dape(seed=0)
    image = lq_image(11, 19, seed=2)  # small-input rule (16x27), x4 (64x108), LANCZOS crop to x8 (64x104)
    expected = reference_osediff(root / "sd2", root / "osediff.pkl", image, seed=7, prompt="a cat", dape=dape)
    pipe = OSEDiffPipeline.from_pretrained(root / "pipe")
    pipe.prompt_extractor = dape  # a component added after loading, as a user would
    pipe.to(dtype=torch.float64)
    pipe.prompt_extractor.to(torch.float32)
    kwargs = {"prompt": "a cat", "process_size": 64, "size_rule": "original"}
    out = pipe(image, generator=torch.Generator().manual_seed(7), output_type="pt", color_fix=None, **kwargs)
    assert out.prompts == [expected["prompt"]] and expected["prompt"].endswith(", a cat,")
    assert len(expected["prompt"]) > len(", a cat,")  # the tiny DAPE did tag the upscaled image
    assert out.images.dtype == torch.float64
    assert (out.images - (expected["decoded"] * 0.5 + 0.5)).abs().max() < 1e-8
    pil = pipe(image, generator=torch.Generator().manual_seed(7), color_fix="adain", **kwargs).images[0]
    assert pil.size == expected["input_size"] == (64, 104)
    assert np.array_equal(_np(pil), expected["adain"])
    # generator=None draws from the global RNG, like the original.
    torch.manual_seed(7)
    pil = pipe(image, color_fix=None, **kwargs).images[0]
    assert np.array_equal(_np(pil), expected["nofix"])


def test_size_rules(pipe):
    image = lq_image(5, 11, seed=1)
    lq, exact = preprocess_osediff(image, 4, 32)
    assert lq.shape == (3, 64, 32) and exact == (20, 44)  # 8x17.6 -> 8x17 -> 32x68 -> LANCZOS 32x64
    original = pipe(image, process_size=32, size_rule="original", generator=torch.Generator().manual_seed(0))
    default = pipe(image, process_size=32, generator=torch.Generator().manual_seed(0))
    assert original.images[0].size == (32, 64) and default.images[0].size == (20, 44)
    assert np.array_equal(_np(default.images[0]), _np(original.images[0].resize((20, 44), 3)))  # 3: bicubic
    tensor = pipe(image, process_size=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert tensor.shape == (1, 3, 44, 20)


def test_generator_batch_and_callback(pipe):
    images = [lq_image(8, 8, seed=1), lq_image(8, 8, seed=2)]
    run = lambda img, g, **kw: pipe(img, process_size=32, output_type="np", generator=g, **kw).images  # noqa: E731
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors["latents"].shape)))
        return {}

    generators = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = run(images, generators, callback_on_step_end=callback)
    assert seen == [(0, 999, (2, 4, 4, 4))]
    singles = [run(img, torch.Generator().manual_seed(s)) for img, s in zip(images, (10, 11), strict=True)]
    assert np.abs(batch - np.concatenate(singles)).max() < 1e-5
    assert np.array_equal(run(images[0], torch.Generator().manual_seed(10)), singles[0])
    other_seed = run(
        images[0], torch.Generator().manual_seed(11), callback_on_step_end=lambda *a: {"latents": a[3]["latents"]}
    )
    assert np.abs(other_seed - singles[0]).max() > 1e-4


def test_tiling_bounds_the_model_inputs(pipe):
    shapes = {"unet": [], "encoder": [], "decoder": []}
    hooks = [
        pipe.unet.register_forward_pre_hook(lambda m, args: shapes["unet"].append(tuple(args[0].shape[-2:]))),
        pipe.vae.encoder.register_forward_pre_hook(lambda m, args: shapes["encoder"].append(tuple(args[0].shape))),
        pipe.vae.decoder.register_forward_pre_hook(lambda m, args: shapes["decoder"].append(tuple(args[0].shape))),
    ]
    try:
        image = lq_image(32, 24, seed=3)
        kwargs = {"process_size": 32, "output_type": "np", "color_fix": None, "size_rule": "original"}
        tiled = pipe(image, generator=torch.Generator().manual_seed(0), latent_tile_size=8, latent_tile_overlap=2,
                     vae_tile_size=64, **kwargs).images  # fmt: skip
        counts = {k: len(v) for k, v in shapes.items()}
        whole = pipe(image, generator=torch.Generator().manual_seed(0), latent_tile_size=None, vae_tile_size=None,
                     **kwargs).images  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    assert tiled.shape == whole.shape == (1, 96, 128, 3)
    assert counts["unet"] == 6 and all(max(s) <= 8 for s in shapes["unet"][: counts["unet"]])
    assert counts["encoder"] > 1 and all(max(s[-2:]) <= 64 for s in shapes["encoder"][: counts["encoder"]])
    assert counts["decoder"] > 1 and all(max(s[-2:]) <= 8 for s in shapes["decoder"][: counts["decoder"]])
    assert np.abs(tiled - whole).mean() < 0.1 and np.abs(tiled - whole).max() > 0  # blended tiles differ a little


def test_vae_tiling_aggregates_groupnorm_statistics(pipe):
    """VAE tiling with image-wide GroupNorm statistics (pipelines/vae_tiling.py): close to the untiled VAE, unlike
    diffusers' tiling, which normalises each tile alone (measured here: max / mean |difference| 0.045 / 0.0025
    against 0.52 / 0.035 for diffusers' tiling, output std 0.16)."""
    image = lq_image(64, 48, seed=3)  # 256x192 output: encoder windows of 128 px, decoder windows of 16 latent px
    kwargs = {"process_size": 32, "output_type": "np", "color_fix": None, "latent_tile_size": None}

    def run(vae_tile_size):
        return pipe(image, generator=torch.Generator().manual_seed(0), vae_tile_size=vae_tile_size, **kwargs).images

    whole, ours = run(None), run(128)
    pipe.vae.enable_tiling()  # diffusers' per-tile normalisation, same tile size
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 128, 16
    try:
        theirs = run(None)
    finally:
        pipe.vae.disable_tiling()
    ours_diff, theirs_diff = np.abs(ours - whole), np.abs(theirs - whole)
    assert ours.shape == whole.shape == (1, 192, 256, 3)
    assert ours_diff.max() < 0.1 and ours_diff.mean() < 0.01, (ours_diff.max(), ours_diff.mean())
    assert theirs_diff.max() > 0.1 and theirs_diff.mean() > 0.01, (theirs_diff.max(), theirs_diff.mean())
    pipe.vae_tiling_exact = False  # the original's fast mode: statistics of the image shrunk to one window
    try:
        fast = run(128)
    finally:
        pipe.vae_tiling_exact = True
    assert fast.shape == whole.shape and np.isfinite(fast).all() and not np.array_equal(fast, ours)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"upscale": 0.5}, "upscale"),
        ({"color_fix": "median"}, "color_fix"),
        ({"output_type": "jpg"}, "output_type"),
        ({"size_rule": "nearest"}, "size_rule"),
        ({"latent_tile_size": 16, "latent_tile_overlap": 16}, "latent_tile_overlap"),
        ({"vae_tile_size": 8}, "vae_tile_size"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "generator"),
        ({"image": torch.zeros(4, 16, 16)}, "image"),
    ],
)
def test_check_inputs(pipe, kwargs, message):
    kwargs = {"image": lq_image(8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(process_size=32, **kwargs)


# Saving, loading, fusing -----------------------------------------------------------------------------------------


def test_fused_and_unfused_agree_and_round_trip(released, pipe, tmp_path):
    root, _ = released
    assert has_lora(pipe.unet) and has_lora(pipe.vae)
    unet_files = sorted(p.name for p in (root / "pipe" / "unet").iterdir())
    assert unet_files == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "onestep_lora.json",
        "onestep_lora.safetensors",
    ]
    assert json.loads((root / "pipe" / "model_index.json").read_text())["unet"][1] == "OneStepUNet2DConditionModel"
    run = lambda p: p(lq_image(8, 8), process_size=32, output_type="pt", generator=torch.Generator().manual_seed(0))  # noqa: E731
    unfused = run(pipe).images
    fused_pipe = OSEDiffPipeline.from_pretrained(root / "pipe", fuse_lora=True)
    assert not has_lora(fused_pipe.unet) and not has_lora(fused_pipe.vae)
    fused = run(fused_pipe).images
    assert 0 < (fused - unfused).abs().max() < 1e-5
    # A fused pipeline saves a plain diffusers UNet / VAE; reloading it gives the same images.
    fused_pipe.save_pretrained(tmp_path / "fused")
    assert not list((tmp_path / "fused").rglob("onestep_lora*"))
    assert torch.equal(run(OSEDiffPipeline.from_pretrained(tmp_path / "fused")).images, fused)
    # Without the adapters the output changes (they are really applied).
    from diffusers import UNet2DConditionModel

    plain = OSEDiffPipeline(
        **{**pipe.components, "unet": UNet2DConditionModel.from_pretrained(root / "pipe" / "unet")}
    )
    assert (run(plain).images - unfused).abs().max() > 1e-3


def test_loads_through_diffusion_pipeline_in_a_fresh_process(released):
    root, _ = released
    code = (
        "import sys, torch; from diffusers import DiffusionPipeline; sys.path.insert(0, 'tests');"
        "from tiny import lq_image;"
        f"p = DiffusionPipeline.from_pretrained({str(root / 'pipe')!r}, trust_remote_code=True);"
        "from peft.tuners.lora import LoraLayer;"
        "assert type(p).__name__ == 'OSEDiffPipeline' and any(isinstance(m, LoraLayer) for m in p.unet.modules());"
        "out = p(lq_image(8, 8), process_size=32, output_type='np', generator=torch.Generator().manual_seed(0));"
        "print(float(out.images.sum()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    here = OSEDiffPipeline.from_pretrained(root / "pipe")
    expected = here(lq_image(8, 8), process_size=32, output_type="np", generator=torch.Generator().manual_seed(0))
    assert abs(float(result.stdout.strip().splitlines()[-1]) - float(expected.images.sum())) < 1e-3


def test_vae_only_adapter_does_not_touch_decoder():
    vae = tiny_vae()
    add_vae_lora(vae)
    assert not any("lora" in n for n, _ in vae.decoder.named_parameters())
    assert not any("lora" in n for n, _ in vae.post_quant_conv.named_parameters())
    assert any("lora" in n for n, _ in vae.quant_conv.named_parameters())
