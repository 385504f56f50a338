"""One-step (OSEDiff) training (seesr/training/osediff.py): config, the VSD gradient, which parameters each phase
moves, exact resume, the export (osediff.pkl + pipeline folder) and a two-process `accelerate launch` run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import write_dape_folder, write_images, write_lq_image, write_sd2_folder
from trainer_cases import assert_config_error, launch_two_processes, only_checkpoint, tiny_run_overrides

from seesr.data.image_folder import ImageFolderDataset, collate
from seesr.training.config import load_config
from seesr.training.loop import list_checkpoints
from seesr.training.osediff import (
    OSEDiffTrainConfig,
    fake_score_loss,
    generator_loss,
    main,
    prepare_batch,
    setup_training,
    vsd_loss,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "osediff.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from seesr.models.lpips import LPIPS, save_lpips

    root = tmp_path_factory.mktemp("osediff_train")
    torch.manual_seed(0)
    save_lpips(LPIPS(), root / "lpips.safetensors")
    return {
        "sd": write_sd2_folder(root / "sd"),
        "dape": write_dape_folder(root / "dape"),
        "hr": write_images(root / "hr"),
        "lq": write_lq_image(root / "lq.png"),
        "lpips": root / "lpips.safetensors",
    }


def overrides(inputs: dict[str, Path], out: Path, steps: int = 2, lpips: bool = False, **extra) -> list[str]:
    lpips_items = {"loss.lambda_lpips": 2.0 if lpips else 0.0,
                   "loss.lpips_weights": f"[{inputs['lpips']}]" if lpips else "[]"}  # fmt: skip
    return tiny_run_overrides(inputs, out, steps, **lpips_items, **extra)


def tiny_config(inputs, out, **extra) -> OSEDiffTrainConfig:
    return load_config(OSEDiffTrainConfig, CONFIG, overrides(inputs, out, **extra))


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_originals():
    cfg = load_config(OSEDiffTrainConfig, CONFIG)
    loss, args = cfg.loss, cfg.train
    assert (loss.lambda_l2, loss.lambda_lpips, loss.lambda_vsd, loss.lambda_vsd_lora) == (1.0, 2.0, 1.0, 1.0)
    assert loss.cfg_vsd == 7.5 and loss.vsd_timesteps == (20, 980) and cfg.lora_rank == 4
    assert (args.learning_rate, args.train_batch_size, args.adam_weight_decay, args.max_grad_norm) == (
        5e-5, 4, 1e-2, 1.0,
    )  # fmt: skip
    assert (args.seed, args.mixed_precision, args.lr_scheduler, args.checkpointing_steps) == (123, "fp16", "constant",
                                                                                             500)  # fmt: skip
    deg = cfg.degradation
    assert (deg.usm_sharpen_gt, deg.resize_lq_to_gt, deg.quantize_lq, deg.scale) == (False, True, True, 4)
    assert cfg.neg_prompt.startswith("painting, oil painting") and cfg.null_text_ratio == 0.0


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["loss.lpips_weights=[]"], r"loss.lambda_lpips=2.0 needs loss.lpips_weights"),
        (["teacher=seesr"], "teacher=seesr needs teacher_model"),
        (["teacher_model=x"], "teacher_model: only used with teacher=seesr"),
        (["loss.vsd_timesteps=[980,20]"], r"loss.vsd_timesteps: expected \[low, high\)"),
        (["degradation.resize_lq_to_gt=false"], "degradation.resize_lq_to_gt must be true"),
        (["pretrained_model="], "pretrained_model: expected a Stable Diffusion 2 folder"),
        (["loss.cfg=1"], "loss.cfg: unknown key"),
        (["timestep=250"], "timestep=250 needs export_pkl=false"),
        (["timestep=1000", "export_pkl=false"], r"timestep: expected an int in \[0, 1000\)"),
    ],
)
def test_config_errors_at_load_time(items, match):
    assert_config_error(OSEDiffTrainConfig, CONFIG, items, match)


# ------------------------------------------------------------------------------------------------ VSD


def test_vsd_gradient_points_from_the_fake_to_the_real_score():
    """d loss / d latents = 2 (x0_fake - x0_real) / (w * numel), w = mean |latents - x0_real| per sample."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    x0_real = torch.randn(2, 4, 3, 3, generator=generator)
    x0_fake = torch.randn(2, 4, 3, 3, generator=generator)
    vsd_loss(latents, x0_fake, x0_real).backward()
    weight = (latents.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 2 * (x0_fake - x0_real) / weight / latents.numel()
    assert latents.grad.shape == latents.shape
    torch.testing.assert_close(latents.grad, expected)
    # a small descent step moves the latents' x0 error towards the real score: fake-real disagreement shrinks
    step = latents.detach() - 1e-3 * latents.grad
    assert ((step - x0_real) * (x0_fake - x0_real)).sum() < ((latents - x0_real) * (x0_fake - x0_real)).sum()
    # no gradient when the fake score already agrees with the real one
    same = torch.randn(1, 4, 2, 2, generator=generator, requires_grad=True)
    target = torch.randn(1, 4, 2, 2, generator=generator)
    vsd_loss(same, target, target).backward()
    assert torch.equal(same.grad, torch.zeros_like(same))


# ------------------------------------------------------------------------------------------------ one step


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_each_phase_moves_only_its_parameters(inputs, tmp_path):
    cfg = tiny_config(inputs, tmp_path, lpips=True)
    parts = setup_training(cfg, "cpu", torch.float32)
    gen, fake = parts.generator, parts.fake_score
    with torch.no_grad():  # non-zero LoRA B so that every LoRA A gets a gradient too
        for module in (gen, fake):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
    frozen = {"text_encoder": parts.text_encoder, "dape": parts.dape, "real": parts.real_score.unet}
    before = {name: _snapshot(m) for name, m in {"gen": gen, "fake": fake, **frozen}.items()}
    gen_trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    fake_trainable = {n for n, p in fake.named_parameters() if p.requires_grad}
    assert gen_trainable == {n for n, _ in gen.named_parameters() if "lora" in n or "unet.conv_in" in n}
    assert any("vae.encoder" in n for n in gen_trainable) and not any("vae.decoder" in n for n in gen_trainable)
    assert "unet.conv_in.base_layer.weight" in gen_trainable and "unet.conv_in.base_layer.weight" not in {
        n for n in fake_trainable
    }
    assert fake_trainable == {n for n, _ in fake.named_parameters() if "lora" in n}

    dataset = ImageFolderDataset(cfg.data.train_data, cfg.data.resolution, seed=0)
    generator = torch.Generator().manual_seed(0)
    batch = prepare_batch(parts, collate([dataset[0], dataset[1]]), cfg, generator)
    assert batch["prompts"][0].endswith(", ,") and batch["lq"].shape == batch["gt"].shape == (2, 3, 32, 32)
    # phase 1: the generator (MSE + LPIPS + VSD); the fake score gets no gradient
    terms = generator_loss(parts, gen, fake, batch, cfg, generator)
    assert set(terms) == {"loss_l2", "loss_lpips", "loss_vsd", "loss", "latents"}
    terms["loss"].backward()
    no_grad = [n for n, p in gen.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == [] and all(p.grad is None for p in fake.parameters())
    torch.optim.SGD([p for p in gen.parameters() if p.requires_grad], lr=0.1).step()
    assert {k for k in _changed(before["gen"], gen)} == gen_trainable
    assert _changed(before["fake"], fake) == set()
    # phase 2: the fake score denoises the generator's (detached) latents; the generator does not move
    gen.zero_grad(set_to_none=True)
    gen_after = _snapshot(gen)
    fake_score_loss(parts, fake, terms["latents"], batch["embeds"], generator).backward()
    assert all(p.grad is None for p in gen.parameters())
    torch.optim.SGD([p for p in fake.parameters() if p.requires_grad], lr=0.1).step()
    assert _changed(before["fake"], fake) == fake_trainable and _changed(gen_after, gen) == set()
    for name, module in frozen.items():
        assert _changed(before[name], module) == set(), name


def test_seesr_teacher_is_the_real_score(inputs, tmp_path, monkeypatch):
    """teacher=seesr: the real score is SeeSR's ControlNet + UNet on the LQ ([0, 1]) and its DAPE tokens, with CFG
    over [negative; positive] prompts; its DAPE also tags the prompts when dape_model is null."""
    from tiny import tiny_pipeline
    from tiny_dape import tiny_dape

    import seesr.denoise

    tiny_pipeline(prompt_extractor=tiny_dape()).save_pretrained(tmp_path / "seesr")
    cfg = tiny_config(inputs, tmp_path, teacher="seesr", teacher_model=tmp_path / "seesr", dape_model="null")
    parts = setup_training(cfg, "cpu", torch.float32)
    assert type(parts.real_score.controlnet).__name__ == "SeeSRControlNetModel" and parts.dape is parts.real_score.dape
    seen = {}
    original = seesr.denoise.predict_noise

    def spy(unet, controlnet, latents, timestep, cond, conditioning_scale=1.0):
        seen.update(latents=latents.shape, cond=cond)
        return original(unet, controlnet, latents, timestep, cond, conditioning_scale)

    monkeypatch.setattr(seesr.denoise, "predict_noise", spy)
    dataset = ImageFolderDataset(cfg.data.train_data, cfg.data.resolution, seed=0)
    generator = torch.Generator().manual_seed(0)
    batch = prepare_batch(parts, collate([dataset[0], dataset[1]]), cfg, generator)
    terms = generator_loss(parts, parts.generator, parts.fake_score, batch, cfg, generator)
    assert torch.isfinite(terms["loss_vsd"]) and terms["loss_vsd"] > 0
    cond = seen["cond"]
    assert seen["latents"][0] == 4 and cond.prompt_embeds.shape[0] == 4  # CFG halves of a batch of 2
    assert torch.equal(cond.control_image, batch["lq01"]) and cond.image_embeds.shape[0] == 2


def test_the_generator_timestep_is_the_exported_pipelines(inputs, tmp_path):
    """timestep=250: the generator runs the UNet at t=250 and its x0 uses abar_250; the pipeline built for export
    stores it in model_index.json, reloads with it and computes the same x0 as the generator (999 would not)."""
    from PIL import Image

    from pipelines import OSEDiffPipeline
    from seesr.training.osediff import build_pipeline

    cfg = tiny_config(inputs, tmp_path, timestep=250, export_pkl="false")
    parts = setup_training(cfg, "cpu", torch.float32)
    generator_model = parts.generator.eval()
    assert generator_model.timestep == 250
    build_pipeline(parts, generator_model.unet, generator_model.vae).save_pretrained(tmp_path / "pipe")
    pipe = OSEDiffPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.config.timestep == 250
    image = Image.open(inputs["lq"])
    lq = pipe.prepare_lq([image], 4, 32).unit()
    embeds = pipe.encode_prompt(pipe.build_prompts(lq, [""]))
    with torch.no_grad():
        _, expected = generator_model(lq * 2 - 1, embeds, torch.Generator().manual_seed(0))
    call = dict(image=image, process_size=32, output_type="latent")
    latents = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    pipe.register_to_config(timestep=999)
    assert not torch.allclose(pipe(**call, generator=torch.Generator().manual_seed(0)).images, expected, atol=1e-3)


# ------------------------------------------------------------------------------------------------ full runs


def _trained_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in ("generator", "fake_score"):
        tensors |= {f"{name}.{k}": v for k, v in load_file(str(checkpoint / f"{name}.safetensors")).items()}
    return tensors


def test_resume_is_exact_and_the_export_reproduces_the_trained_generator(inputs, tmp_path):
    """2 steps straight vs 1 step + resume to 2 (accumulation 2): identical checkpoints; the export's osediff.pkl
    and pipeline folder hold exactly the trained tensors."""
    extra = {"train.checkpointing_steps": 1, "train.gradient_accumulation_steps": 2, "train.train_batch_size": 1,
             "validation.images": f"[{inputs['lq']}]", "validation.steps": 2}  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(["--config", str(CONFIG), *overrides(inputs, straight, 2, **extra)])
    assert [s for s, _ in list_checkpoints(straight)] == [1, 2]
    assert (straight / "validation" / "step-0000002" / "00-lq.png").is_file()  # the real OSEDiffPipeline ran
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    main(["--config", str(CONFIG), "--resume", "latest", *overrides(inputs, resumed, 2, **extra)])
    a, b = _trained_tensors(straight / "checkpoint-2"), _trained_tensors(resumed / "checkpoint-2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume diverged"
    first = _trained_tensors(straight / "checkpoint-1")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # training moved them
    for name in ("optimizer.bin", "optimizer_1.bin"):
        assert (straight / "checkpoint-2" / name).is_file()

    # export: osediff.pkl in the released layout with the trained tensors
    from seesr.models.onestep import read_osediff_checkpoint

    checkpoint = read_osediff_checkpoint(straight / "osediff.pkl")
    generator_state = {k[len("generator.") :]: v for k, v in a.items() if k.startswith("generator.")}
    for key, value in checkpoint.state_dict_unet.items():
        assert torch.equal(value, generator_state[f"unet.{key}"]), key
    for key, value in checkpoint.state_dict_vae.items():
        assert torch.equal(value, generator_state[f"vae.{key}"]), key
    assert len(checkpoint.state_dict_unet) + len(checkpoint.state_dict_vae) == len(generator_state)
    _check_export(inputs, straight, tmp_path)


def _check_export(inputs, out: Path, tmp_path: Path) -> None:
    """pipeline/ = what `seesr convert --osediff osediff.pkl` writes (byte for byte) + the DAPE prompt extractor;
    it loads and gives the same images as a pipeline over the trained modules."""
    import json

    from safetensors.torch import load_file

    from pipelines import OSEDiffPipeline
    from seesr.cli.convert_osediff import convert_osediff
    from seesr.training.osediff import build_pipeline, load_trainable_state

    converted = convert_osediff(str(inputs["sd"]), out / "osediff.pkl", tmp_path / "converted")
    export = out / "pipeline"
    files = sorted(p.relative_to(converted) for p in converted.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(export) for p in export.rglob("*") if p.is_file() and
                            p.relative_to(export).parts[0] != "prompt_extractor") == files  # fmt: skip
    for name in files:
        if name.name != "model_index.json":
            assert (export / name).read_bytes() == (converted / name).read_bytes(), name
    index, reference = (json.loads((d / "model_index.json").read_text()) for d in (export, converted))
    assert index.pop("prompt_extractor") == ["dape.model", "DAPEModel"]
    assert reference.pop("prompt_extractor")[0] is None
    assert index == reference

    cfg = tiny_config(inputs, out)
    parts = setup_training(cfg, "cpu", torch.float32)
    load_trainable_state(parts.generator, load_file(str(out / "checkpoint-2" / "generator.safetensors")), "ckpt")
    live = build_pipeline(parts, parts.generator.unet.eval(), parts.generator.vae.eval())
    loaded = OSEDiffPipeline.from_pretrained(export)
    from PIL import Image

    image = Image.open(inputs["lq"])
    results = [
        pipe(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", process_size=32)
        for pipe in (live, loaded)
    ]
    assert results[0].prompts == results[1].prompts and results[0].prompts[0].endswith(", ,")
    assert torch.equal(results[0].images, results[1].images)


def test_two_processes_train_and_checkpoint(inputs, tmp_path):
    """Two CPU processes (gloo) under `accelerate launch --multi_gpu`: DDP over both trained modules without
    find_unused_parameters, every rank saving its RNG state."""
    out = tmp_path / "ddp"
    extra = {"train.checkpointing_steps": 1, "train.checkpoints_total_limit": 1, "train.train_batch_size": 1,
             "train.gradient_checkpointing": "true"}  # fmt: skip
    args = ["--config", str(CONFIG), *overrides(inputs, out, 2, **extra)]
    checkpoint = only_checkpoint(launch_two_processes("train_osediff.py", args, tmp_path), out, 2)
    assert {p.name for p in checkpoint.iterdir()} >= {"generator.safetensors", "fake_score.safetensors"}
    assert (out / "osediff.pkl").is_file()
