"""Train DAPE: `accelerate launch train_dape.py --config configs/dape.yaml [key=value ...]`.

A frozen teacher (the `DAPEModel` folder ``dape_model``, e.g. RAM converted with ``seesr convert``) sees the HR
crop; a student (the same weights plus LoRA, `DAPEModel.add_lora`) sees the degraded crop, bicubic-upscaled back to
the HR size. Both inputs go through `DAPEModel.preprocess`, as at inference. Loss =
``representation_weight * MSE(student image_embeds, teacher image_embeds)`` +
``logits_weight * BCE(student logits, sigmoid(teacher logits))`` (soft-target BCE). Only the LoRA parameters train;
checkpoints hold only them. The end of training writes the merged model (``output_dir/dape``), a plain DAPE folder.
See docs/training_seesr.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from seesr.data.degradation import DegradationConfig, degraded_condition
from seesr.training.config import config_from_cli
from seesr.training.loop import TrainingArgs, TrainingJob, run_training, shuffled_loader, start_training

from .lora import LORA_ALPHA, LORA_RANK, lora_state_dict

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .model import DAPEModel

logger = logging.getLogger(__name__)

LORA_FILE = "dape_lora.safetensors"


@dataclass
class DAPEDataConfig:
    """HR training images (random square crops; tag files are ignored)."""

    train_data: str = ""
    resolution: int = 512
    random_flip: bool = True

    def __post_init__(self) -> None:
        if not self.train_data:
            raise ValueError("data.train_data: expected a folder or list file of HR images, got ''")
        if self.resolution < 8:
            raise ValueError(f"data.resolution: expected an int >= 8, got {self.resolution!r}")


@dataclass
class DAPETrainConfig:
    """The DAPE training config (configs/dape.yaml); see docs/training_seesr.md for every key."""

    dape_model: str = ""
    lora_rank: int = LORA_RANK
    lora_alpha: float = LORA_ALPHA
    representation_weight: float = 1.0
    logits_weight: float = 1.0
    lr_milestones: list[int] = field(default_factory=lambda: [20_000, 30_000])
    lr_gamma: float = 0.5
    data: DAPEDataConfig = field(default_factory=lambda: DAPEDataConfig(train_data="data/train"))
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    train: TrainingArgs = field(default_factory=lambda: TrainingArgs(learning_rate=1e-4, adam_weight_decay=0.0))
    export_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.dape_model:
            raise ValueError("dape_model: expected a DAPEModel folder (e.g. RAM converted with `seesr convert`)")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank/lora_alpha: expected >= 1 and > 0, got {self.lora_rank}/{self.lora_alpha}")
        if min(self.representation_weight, self.logits_weight) < 0 or not (
            self.representation_weight or self.logits_weight
        ):
            raise ValueError(
                f"representation_weight={self.representation_weight}, logits_weight={self.logits_weight}: "
                "expected weights >= 0, not both 0"
            )
        if self.lr_milestones:
            if sorted(set(self.lr_milestones)) != self.lr_milestones or self.lr_milestones[0] < 1:
                raise ValueError(f"lr_milestones: expected increasing steps >= 1, got {self.lr_milestones}")
            if self.train.lr_scheduler != "constant":
                raise ValueError(
                    f"lr_milestones={self.lr_milestones} (multi-step decay) needs train.lr_scheduler=constant, got "
                    f"{self.train.lr_scheduler!r}; set lr_milestones=[] to use train.lr_scheduler"
                )
        if self.train.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing: DAPEModel does not support it; set it to false")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma: expected a float in (0, 1], got {self.lr_gamma!r}")
        if self.data.resolution % self.degradation.scale:
            raise ValueError(
                f"data.resolution={self.data.resolution} must be divisible by degradation.scale="
                f"{self.degradation.scale}"
            )


def multistep_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DAPETrainConfig, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``train.lr_warmup_steps``, then the rate times ``lr_gamma`` at each of ``lr_milestones``
    (BasicSR's MultiStepLR). Counted in optimizer steps; stepped once per process per step after `prepare`."""
    warmup = cfg.train.lr_warmup_steps * num_processes
    milestones = [m * num_processes for m in cfg.lr_milestones]

    def factor(count: int) -> float:
        decay = cfg.lr_gamma ** sum(count >= m for m in milestones)
        return decay * (min(1.0, (count + num_processes) / warmup) if warmup else 1.0)  # BasicSR: iter / warmup

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_models(cfg: DAPETrainConfig) -> tuple[DAPEModel, DAPEModel]:
    """(frozen teacher, student with trainable LoRA), both from ``dape_model``."""
    from .model import DAPEModel

    teacher = DAPEModel.from_pretrained(cfg.dape_model).requires_grad_(False).eval()
    student = DAPEModel.from_pretrained(cfg.dape_model)
    student.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    return teacher, student.train()


def distillation_loss(
    teacher: DAPEModel,
    student: torch.nn.Module,
    batch: dict[str, Any],
    cfg: DAPETrainConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The DAPE loss terms of one batch ``{"gt": (B, 3, H, W) in [0, 1] on the device}``; ``"loss"`` is the total."""
    with torch.no_grad():
        gt, lq = degraded_condition(batch["gt"], cfg.degradation, generator)
        target = teacher(teacher.preprocess(gt))
    output = student(teacher.preprocess(lq))
    terms = {
        "representation": F.mse_loss(output.image_embeds.float(), target.image_embeds.float()),
        "logits": F.binary_cross_entropy_with_logits(output.logits.float(), torch.sigmoid(target.logits.float())),
    }
    terms["loss"] = cfg.representation_weight * terms["representation"] + cfg.logits_weight * terms["logits"]
    return terms


def register_lora_hooks(accelerator: Accelerator, student: torch.nn.Module) -> None:
    """Checkpoints hold the student's LoRA tensors only (``dape_lora.safetensors``); the base comes from
    ``dape_model`` on resume."""
    from safetensors.torch import load_file, save_file

    from seesr.training.loop import unwrap

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        aligned = len(weights) == len(models)
        for i in reversed(range(len(models))):
            if unwrap(accelerator, models[i]) is student:
                if accelerator.is_main_process:
                    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(student).items()}
                    save_file(tensors, str(Path(output_dir) / LORA_FILE))
                if aligned:
                    weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            if unwrap(accelerator, models[i]) is student:
                models.pop(i)
                path = Path(input_dir) / LORA_FILE
                if not path.is_file():
                    raise FileNotFoundError(f"{input_dir}: checkpoint has no {LORA_FILE}")
                state = load_file(str(path))
                expected = set(lora_state_dict(student))
                if set(state) != expected:
                    raise ValueError(
                        f"{path}: LoRA keys do not match the student (lora_rank/targets changed?): missing "
                        f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
                    )
                missing, unexpected = student.load_state_dict(state, strict=False)
                assert not unexpected and not set(missing) & expected, (missing, unexpected)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def export_dape(cfg: DAPETrainConfig, student: torch.nn.Module) -> Path:
    """The merged student, in float32: a fresh ``dape_model`` + the trained LoRA, merged, ``save_pretrained``."""
    from .model import DAPEModel

    export_dir = Path(cfg.export_dir or Path(cfg.train.output_dir) / "dape")
    model = DAPEModel.from_pretrained(cfg.dape_model)
    model.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    state = {k: v.float() for k, v in lora_state_dict(student).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not set(missing) & set(state), (missing, unexpected)
    model.merge_lora()
    model.save_pretrained(export_dir)
    logger.info("exported the merged DAPE model to %s", export_dir)
    return export_dir


def train_dape(cfg: DAPETrainConfig) -> Path:
    """Train (or resume) DAPE's LoRA as configured; returns the exported (merged) DAPE folder."""
    from seesr.data.image_folder import ImageFolderDataset, collate
    from seesr.training.loop import cast_training_params, frozen_weight_dtype, make_lr_scheduler, trainable_parameters

    args = cfg.train
    accelerator = start_training(cfg, "dape")
    weight_dtype = frozen_weight_dtype(accelerator)
    teacher, student = load_models(cfg)
    for model in (teacher, student):
        model.to(accelerator.device) if weight_dtype == torch.float32 else model.to(accelerator.device, weight_dtype)
    cast_training_params(student, torch.float32)
    dataset = ImageFolderDataset(cfg.data.train_data, cfg.data.resolution, cfg.data.random_flip, seed=args.seed or 0)
    loader = shuffled_loader(dataset, args, collate)
    params = trainable_parameters(student)

    def lr_schedule(optimizer):
        if cfg.lr_milestones:
            return multistep_lr_scheduler(optimizer, cfg, accelerator.num_processes)
        return make_lr_scheduler(optimizer, args)

    job = TrainingJob(
        models={"student": student},
        params=params,
        loader=loader,
        loss=lambda models, batch, generator: distillation_loss(teacher, models["student"], batch, cfg, generator),
        export=lambda models: export_dape(cfg, models["student"]),
        export_dir=Path(cfg.export_dir or Path(args.output_dir) / "dape"),
        make_lr_scheduler=lr_schedule,
        checkpoint_hooks=lambda accelerator: register_lora_hooks(accelerator, student),
        description=f"DAPE: {sum(p.numel() for p in params) / 1e6:.3f} M trainable LoRA parameters",
    )
    return run_training(accelerator, args, job)


def main(argv: list[str] | None = None) -> None:
    description = "Train DAPE (LoRA on RAM) to tag and represent degraded images like clean ones."
    train_dape(config_from_cli(DAPETrainConfig, description, argv))
