"""DAPE training (dape/train.py): config checks, the LR schedule, one step in-process (only LoRA moves), and an
`accelerate launch` run with a LoRA-only checkpoint, an in-process resume and a merged export the pipeline takes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import ROOT, config_error_test, launch_script, write_dape_folder, write_images, write_lq_image

from dape.train import DAPETrainConfig, distillation_loss, load_models, main, multistep_lr_scheduler
from seesr.data.image_folder import ImageFolderDataset, collate
from seesr.training.config import load_config
from seesr.training.loop import list_checkpoints

CONFIG = ROOT / "configs" / "dape.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dape_train")
    return {"dape": write_dape_folder(root / "dape"), "hr": write_images(root / "hr", tagged=0)}


def overrides(inputs: dict[str, Path], out: Path, steps: int = 2, **extra) -> list[str]:
    items = {
        "dape_model": inputs["dape"],
        "data.train_data": inputs["hr"],
        "data.resolution": 32,
        "train.output_dir": out,
        "train.max_train_steps": steps,
        "train.train_batch_size": 2,
        "train.dataloader_num_workers": 0,
        "train.report_to": "none",
        "train.learning_rate": 1e-3,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def test_config_defaults_are_the_originals():
    cfg = load_config(DAPETrainConfig, CONFIG)
    assert (cfg.train.learning_rate, cfg.train.adam_weight_decay, cfg.train.train_batch_size) == (1e-4, 0.0, 8)
    assert (cfg.lr_milestones, cfg.lr_gamma, cfg.lora_rank, cfg.lora_alpha) == ([20000, 30000], 0.5, 8, 1.0)
    assert (cfg.representation_weight, cfg.logits_weight, cfg.train.mixed_precision) == (1.0, 1.0, "no")


test_config_errors_at_load_time = config_error_test(
    DAPETrainConfig,
    CONFIG,
    [
        (["train.lr_scheduler=cosine"], "lr_milestones=.*needs train.lr_scheduler=constant, got 'cosine'"),
        (["lr_milestones=[30000, 20000]"], r"lr_milestones: expected increasing steps >= 1, got \[30000, 20000\]"),
        (["lr_gamma=0"], r"lr_gamma: expected a float in \(0, 1\], got 0"),
        (["representation_weight=0", "logits_weight=0"], "not both 0"),
        (["train.gradient_checkpointing=true"], "DAPEModel does not support it"),
        (["dape_model="], "dape_model: expected a DAPEModel folder"),
        (["lora_rank=x"], "lora_rank: expected int"),
    ],
)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_multistep_schedule_with_warmup(num_processes):
    cfg = load_config(
        DAPETrainConfig, CONFIG, ["lr_milestones=[3, 5]", "train.lr_warmup_steps=2", "train.learning_rate=1"]
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = multistep_lr_scheduler(optimizer, cfg, num_processes)
    lrs = []
    for _ in range(7):
        lrs.append(scheduler.get_last_lr()[0])
        for _ in range(num_processes):  # accelerate steps a prepared scheduler once per process
            optimizer.step()
            scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])  # BasicSR: lr * iter / warmup from iter 1


def test_one_step_moves_only_lora(inputs, tmp_path):
    cfg = load_config(DAPETrainConfig, CONFIG, overrides(inputs, tmp_path))
    teacher, student = load_models(cfg)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (teacher, student)]
    dataset = ImageFolderDataset(cfg.data.train_data, cfg.data.resolution, seed=0)
    terms = distillation_loss(
        teacher, student, collate([dataset[0], dataset[1]]), cfg, torch.Generator().manual_seed(0)
    )
    assert set(terms) == {"representation", "logits", "loss"} and terms["loss"] > 0
    torch.testing.assert_close(terms["loss"], terms["representation"] + terms["logits"])
    terms["loss"].backward()
    assert [n for n, p in trainable.items() if p.grad is None] == []  # every LoRA tensor is in the graph (DDP)
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0).step()
    after = [m.state_dict() for m in (teacher, student)]
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())  # the teacher is frozen
    changed = {k for k, v in before[1].items() if not torch.equal(v, after[1][k])}
    assert changed and all("lora_B" in k for k in changed)  # B starts at 0, so A's first gradient is 0


def test_accelerate_launch_checkpoint_resume_export(inputs, tmp_path, caplog):
    """2 steps under `accelerate launch` (LoRA-only checkpoint-2), an in-process resume to step 3, a merged export
    that loads as a DAPEModel, differs from the base only in the LoRA targets, and drives a SeeSRPipeline."""
    from tiny import tiny_pipeline

    from dape import DAPEModel

    out = tmp_path / "run"
    extra = {"train.checkpointing_steps": 2, "lr_milestones": "[1]"}
    args = ["--config", str(CONFIG), "--report_to", "tensorboard", *overrides(inputs, out, 2, **extra)]
    result = launch_script("train_dape.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} == {
        "dape_lora.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
    }  # fmt: skip
    assert load_file(checkpoint / "dape_lora.safetensors") and all(
        ".lora_" in k for k in load_file(checkpoint / "dape_lora.safetensors")
    )
    assert (out / "config.yaml").is_file() and list((out / "logs").rglob("events.out.tfevents*"))

    with caplog.at_level(logging.INFO):
        main(["--config", str(CONFIG), "--resume", "latest", *overrides(inputs, out, 3, **extra)])
    assert "checkpoint-2 (step 2)" in caplog.text and "DAPE: 0.0" in caplog.text and "step 2" in caplog.text
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]

    merged, base = DAPEModel.from_pretrained(out / "dape"), DAPEModel.from_pretrained(inputs["dape"])
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert not merged.has_lora and public(merged.config) == public(base.config)
    base_state = base.state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed and all(k.endswith(("query.weight", "value.weight", "key.weight")) for k in changed)
    pipe = tiny_pipeline(prompt_extractor=merged, image_cross_attention_dim=merged.config.projection_dim)
    pipe.set_progress_bar_config(disable=True)
    lq = write_lq_image(tmp_path / "lq.png")
    from PIL import Image

    result = pipe(image=[Image.open(lq)], num_inference_steps=1, process_size=64, generator=torch.Generator())
    assert result.images[0].size == (64, 64)
