"""SeeSR-Turbo: `seesr convert --seesr DIR --sd-turbo DIR` on tiny folders in the released layouts."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import SD2_SCHEDULER, lq_image, released_keys, tiny_text_encoder, tiny_tokenizer, tiny_unet_config, tiny_vae

from pipelines import SeeSRPipeline
from seesr.cli import main
from seesr.cli.convert import ConversionError

#: stabilityai/sd-turbo's scheduler/scheduler_config.json (an Euler scheduler with "trailing" spacing).
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    **{k: v for k, v in SD2_SCHEDULER.items() if k != "timestep_spacing"},
    "interpolation_type": "linear",
    "skip_prk_steps": True,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
TURBO_SAMPLE_SIZE = 24  # differs from the SeeSR config's, to see whose architecture config is used


def _fill(model: torch.nn.Module, base: float | None, seed: int) -> dict:
    """Give every tensor a value that names its source (``base`` + key index / 1e4) or seeded noise (base None)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, tensor) in enumerate(sorted(model.state_dict().items())):
            if base is None:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
            else:
                tensor.fill_(base + i * 1e-4)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_turbo_folder(folder, bases=None, extra_unet_key=None) -> dict:
    """A tiny SD-Turbo folder in diffusers layout; returns {component: state dict}."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    bases = bases or {}
    states = {}
    for seed, (name, model) in enumerate(
        (
            ("vae", tiny_vae(0)),
            ("text_encoder", tiny_text_encoder(0)),
            ("unet", UNet2DConditionModel.from_config(_turbo_unet_config())),
        )
    ):
        states[name] = _fill(model, bases.get(name), seed + 20)
        model.save_pretrained(folder / name)
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    EulerDiscreteScheduler.from_config(SD_TURBO_SCHEDULER).save_pretrained(folder / "scheduler")
    if extra_unet_key:
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({**load_file(str(path)), extra_unet_key: torch.zeros(2)}, str(path))
    return states


def _turbo_unet_config() -> dict:
    config = {k: v for k, v in tiny_unet_config().items() if "image_" not in k}
    config["sample_size"] = TURBO_SAMPLE_SIZE
    return config


def write_seesr_folder(folder, unet_base=None, controlnet_base=None, drop=None) -> dict:
    """A tiny released SeeSR folder (unet/ + controlnet/), values naming the source; returns the two states."""
    from safetensors.torch import save_file
    from tiny import released_config

    states = {}
    for offset, (name, base) in enumerate((("unet", unet_base), ("controlnet", controlnet_base))):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(released_config(name)))
        generator = torch.Generator().manual_seed(30 + offset)
        state = {}
        for i, (key, shape) in enumerate(sorted(released_keys(name).items())):
            state[key] = (
                torch.randn(shape, generator=generator) * 0.05 if base is None else torch.full(shape, base + i * 1e-4)
            )
        if drop and name == "unet":
            del state[drop]
        save_file(state, str(folder / name / "diffusion_pytorch_model.safetensors"))
        states[name] = state
    return states


def _convert(root, out, *extra) -> int:
    return main(["convert", "--seesr", str(root / "seesr"), "--sd-turbo", str(root / "turbo"), "-o", str(out), *extra])


def test_every_tensor_comes_from_its_source(tmp_path):
    turbo = write_turbo_folder(tmp_path / "turbo", bases={"vae": 1.0, "text_encoder": 2.0, "unet": 3.0})
    seesr = write_seesr_folder(tmp_path / "seesr", unet_base=4.0, controlnet_base=5.0)
    out = tmp_path / "pipe"
    assert _convert(tmp_path, out) == 0
    pipe = SeeSRPipeline.from_pretrained(out)

    unet = pipe.unet.state_dict()
    rca = {k for k in unet if ".image_attentions." in k}
    assert rca and rca == {k for k in seesr["unet"] if ".image_attentions." in k}
    for key, value in unet.items():
        source = seesr["unet"] if key in rca else turbo["unet"]
        assert torch.equal(value, source[key]), key
    assert set(unet) - rca == set(turbo["unet"])
    # SeeSR's own Stable Diffusion tensors (value 4.x) were ignored on purpose: none of them is in the UNet.
    assert not any(torch.equal(unet[k], v) for k, v in seesr["unet"].items() if k not in rca)
    assert pipe.unet.config.sample_size == TURBO_SAMPLE_SIZE  # the turbo folder's architecture config
    for name, state in (
        ("controlnet", seesr["controlnet"]),
        ("vae", turbo["vae"]),
        ("text_encoder", turbo["text_encoder"]),
    ):
        loaded = getattr(pipe, name).state_dict()
        assert set(loaded) >= set(state) and all(torch.equal(loaded[k], v) for k, v in state.items()), name

    # Turbo's scheduler and defaults, stored in the folder.
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    index = json.loads((out / "model_index.json").read_text())
    assert index["model_kind"] == "seesr-turbo"
    assert index["sampling_defaults"] == {"num_inference_steps": 2, "guidance_scale": 1.0, "latent_tile_overlap": 32}


def test_turbo_defaults_apply_and_callers_override(tmp_path):
    write_turbo_folder(tmp_path / "turbo")
    write_seesr_folder(tmp_path / "seesr")
    assert _convert(tmp_path, tmp_path / "pipe") == 0
    pipe = SeeSRPipeline.from_pretrained(tmp_path / "pipe")
    seen, prompts = [], []
    pipe.text_encoder.register_forward_hook(lambda m, args, out: prompts.append(args[0].shape[0]))

    def callback(p, i, t, tensors):
        seen.append(int(t))
        return tensors

    out = pipe(lq_image(16, 16), process_size=64, output_type="np", callback_on_step_end=callback)
    assert seen == [999, 499] and prompts == [1]  # 2 steps, no CFG batch (no negative prompt)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    seen.clear()
    pipe(lq_image(16, 16), process_size=64, num_inference_steps=4, guidance_scale=3.0, callback_on_step_end=callback)
    assert seen == [999, 749, 499, 249] and prompts == [1, 2]


def test_unaccounted_keys_are_errors_naming_them(tmp_path, caplog):
    write_turbo_folder(tmp_path / "turbo", extra_unet_key="down_blocks.0.surprise.weight")
    rca_key = sorted(k for k in released_keys("unet") if ".image_attentions." in k)[0]
    write_seesr_folder(tmp_path / "seesr", drop=rca_key)
    with caplog.at_level(logging.ERROR):
        assert _convert(tmp_path, tmp_path / "pipe") == 1
    assert "down_blocks.0.surprise.weight" in caplog.text
    assert not (tmp_path / "pipe").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    from seesr.cli.convert_turbo import assemble_turbo_unet

    write_turbo_folder(tmp_path / "turbo2")
    with pytest.raises(ConversionError, match=f"neither the SD-Turbo nor the SeeSR RCA weights: {rca_key}"):
        assemble_turbo_unet(str(tmp_path / "turbo2"), tmp_path / "seesr")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert (
            main(
                [
                    "convert",
                    "--seesr",
                    str(tmp_path / "seesr"),
                    "--sd-turbo",
                    str(tmp_path / "nope"),
                    "-o",
                    str(tmp_path / "x"),
                ]
            )
            == 1
        )
    assert "SD-Turbo folder not found" in caplog.text


def _ddpm_alphas_cumprod() -> torch.Tensor:
    """SD's "scaled_linear" schedule as diffusers computes it (float32), then float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).double()


def _reference_turbo(pipe, image: torch.Tensor, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original turbo script's algorithm restated on the pipeline's models (float64): (final latents, image).

    Bicubic x4 condition in [0, 1]; prompt "{user prompt}," + added prompt, no CFG; the LR latent (a posterior
    sample) noised at t=999; two DDPM steps at 999 and 499 (posterior mean + "fixed_small" variance noise, drawn
    from the generator at both steps); decode, clamp. RNG order as the pipeline documents it: start noise, then
    the step noises from ``generator``; the posterior sample from a generator seeded ``seed ^ 0x5EE5``.
    """
    dtype = torch.float64
    lq = F.interpolate(image[None], size=(64, 64), mode="bicubic").clamp(0, 1).to(dtype)
    ids = pipe.tokenizer(
        [",clean, high-resolution, 8k"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    text = pipe.text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 4, 8, 8), generator=generator, dtype=dtype)
    moments = pipe.vae.quant_conv(pipe.vae.encoder(lq * 2 - 1))
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    posterior = torch.Generator().manual_seed(seed ^ 0x5EE5)
    z = (mean + std * torch.randn(mean.shape, generator=posterior, dtype=dtype)) * pipe.vae.config.scaling_factor
    acp = _ddpm_alphas_cumprod()
    x = acp[999].sqrt() * z + (1 - acp[999]).sqrt() * noise
    for t, prev in ((999, 499), (499, -1)):
        timestep = torch.tensor(t)
        down, mid = pipe.controlnet(x, timestep, text, lq, image_encoder_hidden_states=tokens, return_dict=False)
        eps = pipe.unet(
            x,
            timestep,
            text,
            image_encoder_hidden_states=tokens,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        a_t, a_prev = acp[t], (acp[prev] if prev >= 0 else torch.tensor(1.0, dtype=dtype))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        beta_t = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)) * x
        variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        x = mean + variance.sqrt() * torch.randn(x.shape, generator=generator, dtype=dtype)
    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return x, ((decoded.clamp(-1, 1) + 1) / 2)[0]


@torch.no_grad()
def test_float64_matches_the_turbo_algorithm(tmp_path):
    write_turbo_folder(tmp_path / "turbo")
    write_seesr_folder(tmp_path / "seesr")
    assert _convert(tmp_path, tmp_path / "pipe") == 0
    pipe = SeeSRPipeline.from_pretrained(tmp_path / "pipe").to(dtype=torch.float64)
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    tokens = torch.randn(1, 5, 512, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = {"process_size": 64, "image_embeds": tokens, "latent_tile_size": None, "vae_tile_size": None}
    latents = pipe(image, generator=torch.Generator().manual_seed(7), output_type="latent", **kwargs).images
    images = pipe(image, generator=torch.Generator().manual_seed(7), output_type="pt", color_fix=None, **kwargs).images
    ref_latents, ref_image = _reference_turbo(pipe, image, tokens, seed=7)
    assert latents.dtype == torch.float64 and latents.abs().max() > 0.1
    torch.testing.assert_close(latents, ref_latents, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(images[0].double(), ref_image, rtol=0, atol=1e-6)  # the pipeline decodes to float32
