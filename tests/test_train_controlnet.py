"""SeeSR training (seesr/training/controlnet.py): config checks, one step in-process (which parameters move, loss
targets), an `accelerate launch` run with checkpoint, validation and export, an in-process resume, and a two-process
run."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_training import ENV, ROOT, launch_script, write_dape_folder, write_images, write_lq_image, write_sd2_folder

from seesr.data.image_folder import ImageFolderDataset, collate
from seesr.training.config import ConfigError, load_config
from seesr.training.controlnet import SeeSRTrainConfig, main, setup_training, training_loss
from seesr.training.loop import list_checkpoints

CONFIG = ROOT / "configs" / "controlnet.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seesr_train")
    return {
        "sd": write_sd2_folder(root / "sd"),
        "dape": write_dape_folder(root / "dape"),
        "hr": write_images(root / "hr"),
        "lq": write_lq_image(root / "lq.png"),
    }


def overrides(inputs: dict[str, Path], out: Path, steps: int = 2, dape: bool = True, **extra) -> list[str]:
    items = {
        "pretrained_model": inputs["sd"],
        "dape_model": inputs["dape"] if dape else "null",
        "data.train_data": inputs["hr"],
        "data.resolution": 32,
        "train.output_dir": out,
        "train.max_train_steps": steps,
        "train.train_batch_size": 2,
        "train.mixed_precision": "'no'",
        "train.dataloader_num_workers": 0,
        "train.report_to": "none",
        **({} if dape else {"trainable_modules": "[]"}),
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def tiny_config(inputs, out, **extra) -> SeeSRTrainConfig:
    return load_config(SeeSRTrainConfig, CONFIG, overrides(inputs, out, **extra))


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_originals():
    cfg = load_config(SeeSRTrainConfig, CONFIG)
    args = cfg.train
    assert (args.learning_rate, args.train_batch_size, args.adam_weight_decay, args.max_grad_norm) == (
        5e-5, 16, 1e-2, 1.0,
    )  # fmt: skip
    assert (args.checkpointing_steps, args.mixed_precision, args.lr_scheduler) == (500, "fp16", "constant")
    assert cfg.data.resolution == 512 and cfg.null_text_ratio == 0.5 and cfg.trainable_modules == ["image_attentions"]
    assert cfg.degradation.scale == 4 and cfg.degradation.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["dape_model=null"], r"without dape_model RCA gets no DAPE tokens.*\['image_attentions'\]"),
        (["null_text_ratio=1.5"], r"null_text_ratio: expected a float in \[0, 1\], got 1.5"),
        (["data.resolution=40"], r"data.resolution=40 must be divisible by degradation.scale=16"),
        (["pretrained_model="], "pretrained_model: expected a Stable Diffusion 2 folder"),
        (["validation.images=[missing.png]"], r"validation.images: no such file\(s\) \['missing.png'\]"),
        (["train.lr=1"], "train.lr: unknown key"),
        (["degradation.kernel_prob=[1.0]"], "kernel_prob"),
    ],
)
def test_config_errors_at_load_time(items, match):
    extra = ["degradation.scale=16"] if "data.resolution=40" in items else []
    with pytest.raises((ValueError, ConfigError), match=match):
        load_config(SeeSRTrainConfig, CONFIG, [*extra, *items])


def test_unknown_trainable_module_is_an_error(inputs, tmp_path):
    cfg = tiny_config(inputs, tmp_path, trainable_modules="[image_attentions,no_such_block]")
    with pytest.raises(ValueError, match="trainable_modules: 'no_such_block' matches no module"):
        setup_training(cfg, "cpu", torch.float32)


# ------------------------------------------------------------------------------------------------ one step


def _batch(cfg):
    dataset = ImageFolderDataset(cfg.data.train_data, cfg.data.resolution, seed=0)
    return collate([dataset[0], dataset[1]])


def _snapshot(*modules) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


@pytest.mark.parametrize("with_dape", [True, False], ids=["dape", "no-dape"])
def test_one_step_moves_only_the_intended_parameters(inputs, tmp_path, with_dape):
    cfg = tiny_config(inputs, tmp_path, dape=with_dape, **{"train.adam_weight_decay": 0.0})
    setup = setup_training(cfg, "cpu", torch.float32)
    parts, unet, controlnet = setup.parts, setup.unet, setup.controlnet
    assert setup.unet_trains == with_dape
    with torch.no_grad():  # give the zero-initialised ControlNet outputs values, so that every weight gets a gradient
        for name, param in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    frozen = [parts.vae, parts.text_encoder] + ([parts.dape] if with_dape else [])
    before = _snapshot(unet, controlnet, *frozen)
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trainable |= {f"controlnet.{n}": p for n, p in controlnet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)

    loss = training_loss(parts, unet, controlnet, _batch(cfg), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    # every trainable parameter takes part in the loss (so DDP needs no find_unused_parameters)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    optimizer.step()

    after = _snapshot(unet, controlnet, *frozen)
    changed = {
        f"{owner}.{key}"
        for owner, old, new in zip(["unet", "controlnet", "vae", "text_encoder", "dape"], before, after)
        for key in old
        if not torch.equal(old[key], new[key])
    }
    assert changed == set(trainable)
    rca = {n for n in trainable if ".image_attentions." in n}
    if with_dape:  # the UNet's RCA and the whole ControlNet train; the SD UNet stays frozen
        assert {n for n in trainable if n.startswith("unet.")} == {n for n in rca if n.startswith("unet.")} != set()
        assert {n for n, _ in controlnet.named_parameters()} == {n[len("controlnet.") :] for n in trainable if
                                                                 n.startswith("controlnet.")}  # fmt: skip
    else:  # without DAPE tokens RCA is skipped, so it is frozen everywhere
        assert rca == set() and not any(n.startswith("unet.") for n in trainable)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_target_follows_the_scheduler(inputs, tmp_path, monkeypatch, prediction_type):
    cfg = tiny_config(inputs, tmp_path)
    setup = setup_training(cfg, "cpu", torch.float32)
    setup.parts.scheduler.register_to_config(prediction_type=prediction_type)
    seen = {}

    def fake_predict(unet, controlnet, latents, timestep, cond, conditioning_scale=1.0):
        seen.update(latents=latents, cond=cond)
        return torch.zeros_like(latents)

    monkeypatch.setattr("seesr.training.controlnet.predict_noise", fake_predict)
    monkeypatch.setattr(setup.parts.scheduler, "get_velocity", lambda x, noise, t: torch.full_like(x, 3.0))
    run = lambda: training_loss(setup.parts, setup.unet, setup.controlnet, _batch(cfg), cfg,  # noqa: E731
                                torch.Generator().manual_seed(0))  # fmt: skip
    if prediction_type == "sample":
        with pytest.raises(ValueError, match="prediction_type='sample': expected epsilon or v_prediction"):
            run()
        return
    loss = run()
    if prediction_type == "v_prediction":
        assert loss.item() == pytest.approx(9.0)
    else:
        assert 0.3 < loss.item() < 3  # mean square of standard normal noise
    # the condition: bicubic LQ in [0, 1] at the crop size, DAPE tokens of the tiny DAPE
    cond = seen["cond"]
    assert (
        cond.control_image.shape == (2, 3, 32, 32) and 0 <= cond.control_image.min() <= cond.control_image.max() <= 1
    )
    assert cond.image_embeds.shape == (2, 17, 16) and seen["latents"].shape == (2, 4, 4, 4)


# ------------------------------------------------------------------------------------------------ full runs


def test_accelerate_launch_checkpoint_validation_resume_export(inputs, tmp_path, caplog):
    """2 steps under `accelerate launch` (gradient checkpointing, validation, TensorBoard, checkpoint-2), then an
    in-process resume to step 3; the export loads as a SeeSRPipeline and runs."""
    from pipelines import SeeSRPipeline
    from seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    out = tmp_path / "run"
    extra = {
        "train.checkpointing_steps": 2,
        "train.checkpoints_total_limit": 2,
        "train.gradient_checkpointing": "true",
        "validation.images": f"[{inputs['lq']}]",
        "validation.steps": 2,
        "validation.num_inference_steps": 1,
        "validation.process_size": 64,
    }
    args = ["--config", str(CONFIG), "--report_to", "tensorboard", *overrides(inputs, out, 2, **extra)]
    result = launch_script("train_controlnet.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 3 training images have no tag file: they are tagged on the fly by DAPE" in result.stderr
    assert (out / "config.yaml").is_file() and list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "validation" / "step-0000002" / "00-lq.png").is_file()
    assert {p.name for p in (out / "checkpoint-2").iterdir()} >= {"unet", "controlnet", "optimizer.bin"}

    with caplog.at_level(logging.INFO, logger="seesr"):
        main(["--config", str(CONFIG), "--resume", "latest", *overrides(inputs, out, 3, **extra)])
    assert "resuming from" in caplog.text and "checkpoint-2 (step 2)" in caplog.text and "step 3" in caplog.text
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]

    # the export holds the trained weights (float32) and loads as a pipeline
    final = out / "checkpoint-3"
    unet, controlnet = (SeeSRUNet2DConditionModel.from_pretrained(out / "unet"),
                        SeeSRControlNetModel.from_pretrained(out / "controlnet"))  # fmt: skip
    for model, name in ((unet, "unet"), (controlnet, "controlnet")):
        trained = type(model).from_pretrained(final, subfolder=name).state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
    pipe = SeeSRPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.prompt_extractor).__name__ == "DAPEModel"
    from PIL import Image

    image = pipe(image=[Image.open(inputs["lq"])], num_inference_steps=1, process_size=64,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 64)


def test_two_processes_train_and_checkpoint(inputs, tmp_path):
    """Two CPU processes (gloo): DDP without find_unused_parameters (with gradient checkpointing), every rank
    saving checkpoints."""
    out = tmp_path / "ddp"
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    extra = {
        "train.checkpointing_steps": 1,
        "train.checkpoints_total_limit": 1,
        "train.train_batch_size": 1,
        "train.gradient_checkpointing": "true",
    }
    script = [str(ROOT / "train_controlnet.py"), "--config", str(CONFIG), *overrides(inputs, out, 2, **extra)]
    # The real launcher: `accelerate launch --multi_gpu --num_processes 2` runs gloo on CPU with ACCELERATE_USE_CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command = [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2] and not list(out.glob("*.partial"))
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
