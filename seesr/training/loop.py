"""The training loop every trainer shares (SeeSR ControlNet, DAPE, TGSR, ...) and its plumbing: no model specifics.

A trainer embeds `TrainingArgs` in its config dataclass (as a `train:` block), builds its models, data loader and
loss, and hands them to `run_training` as a `TrainingJob`::

    accelerator = make_accelerator(cfg.train, "my-trainer", config=config_to_dict(cfg))
    write_resolved_config(cfg, cfg.train.output_dir, accelerator)
    model = ...  # on accelerator.device; frozen parts in frozen_weight_dtype(accelerator)
    job = TrainingJob(
        models={"model": model},                      # prepared, checkpointed, resumed
        params=trainable_parameters(model),
        loader=DataLoader(dataset, batch_size=cfg.train.train_batch_size, shuffle=True),
        loss=lambda models, batch, generator: {"loss": ...},   # models are the prepared ones
        export=lambda models: save(models["model"]),          # unwrapped, main process, after the last step
        export_dir=Path(cfg.train.output_dir) / "export",
    )
    return run_training(accelerator, cfg.train, job)

`run_training` does the rest: optimizer and LR schedule, ``accelerator.prepare``, resume from ``train.resume``
into the same shuffled order and position (`epoch_batches`), one generator per optimizer step seeded by
(seed, step, process) for every random draw of the step function (`step_generator`), gradient accumulation,
clipping and stepping (`apply_gradients`), logging, a non-finite-loss check and checkpoints when due
(`finish_step`), validation when due, ``wait_for_everyone`` and the export on the main process. The step
function of a resumed run draws what the uninterrupted run draws. A job that trains several parameter groups
with their own optimizers in turn (OSEDiff: generator, then fake score) adds them as ``phases`` (`LossPhase`):
each phase's loss sees what the earlier ones returned and is stepped right after them on the same micro-batch.
The building blocks stay public for tests and special cases.

Checkpoints are folders `output_dir/checkpoint-{step}` written by `accelerator.save_state`; every model named in
`register_save_load_hooks` (by default the job's ``models``) is stored in it with `save_pretrained` in a
subfolder of that name.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from seesr.dtypes import torch_dtype
from seesr.training.config import config_to_dict, save_config

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"
LRSchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class TrainingArgs:
    """Settings every training stage shares; embedded in each stage's config as its `train:` block."""

    output_dir: str = "output"
    seed: int | None = 42
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 10_000
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    lr_scheduler: LRSchedulerName = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
            _require(name, getattr(self, name), getattr(self, name) >= 1, "an int >= 1")
        _require("logging_steps", self.logging_steps, self.logging_steps >= 1, "an int >= 1")
        _require("lr_warmup_steps", self.lr_warmup_steps, self.lr_warmup_steps >= 0, "an int >= 0")
        _require("dataloader_num_workers", self.dataloader_num_workers, self.dataloader_num_workers >= 0, ">= 0")
        _require("learning_rate", self.learning_rate, self.learning_rate > 0, "a float > 0")
        _require("adam_beta1", self.adam_beta1, 0 <= self.adam_beta1 < 1, "a float in [0, 1)")
        _require("adam_beta2", self.adam_beta2, 0 <= self.adam_beta2 < 1, "a float in [0, 1)")
        _require("adam_weight_decay", self.adam_weight_decay, self.adam_weight_decay >= 0, "a float >= 0")
        _require("adam_epsilon", self.adam_epsilon, self.adam_epsilon > 0, "a float > 0")
        if self.max_grad_norm is not None:
            _require("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "a float > 0 or None")
        if self.checkpoints_total_limit is not None:
            _require("checkpoints_total_limit", self.checkpoints_total_limit, self.checkpoints_total_limit >= 1,
                     "an int >= 1 or None")  # fmt: skip
        if not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")


VAE_SCALE = 8  # Stable Diffusion's VAE downsampling: crops are multiples of it


@dataclass
class DataConfig:
    """HR training images (random square crops, flipped when ``random_flip``); tags are read from ``NAME.txt``
    files in ``tags_dir`` when set. The ``data:`` block of the SeeSR ControlNet and OSEDiff trainers."""

    train_data: str = ""
    tags_dir: str | None = None
    resolution: int = 512
    random_flip: bool = True

    def __post_init__(self) -> None:
        if not self.train_data:
            raise ValueError("data.train_data: expected a folder or list file of HR images, got ''")
        if self.resolution < 8 or self.resolution % VAE_SCALE:
            raise ValueError(f"data.resolution: expected a multiple of {VAE_SCALE} >= 8, got {self.resolution!r}")
        if self.tags_dir is not None and not Path(self.tags_dir).is_dir():
            raise ValueError(f"data.tags_dir: {self.tags_dir!r} is not a folder")


@dataclass
class ValidationArgs:
    """Held-out LQ images that the trainer's real pipeline super-resolves every ``steps`` optimizer steps and after
    the last one (no images: no validation), with its generator seeded by ``seed``. The ``validation:`` block's
    common part (a trainer's block subclasses it to add its pipeline's settings)."""

    images: list[str] = field(default_factory=list)
    steps: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        missing = [p for p in self.images if not Path(p).is_file()]
        if missing:
            raise ValueError(f"validation.images: no such file(s) {missing}")
        if self.steps < 1:
            raise ValueError(f"validation.steps: expected an int >= 1, got {self.steps!r}")


def save_validation_images(
    accelerator: Accelerator, images: Sequence[Any], sources: Sequence[str | Path], output_dir: str | Path, step: int
) -> Path:
    """Write the validation results (PIL images, one per source image) to
    ``output_dir/validation/step-{step:07d}/{i:02d}-{source stem}.png`` and to TensorBoard; returns the folder."""
    import numpy as np

    folder = Path(output_dir) / "validation" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, source) in enumerate(zip(images, sources, strict=True)):
        image.save(folder / f"{i:02d}-{Path(source).stem}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, image in enumerate(images):
                tracker.log_images({f"validation/{i:02d}": np.asarray(image)[None]}, step, dataformats="NHWC")
    logger.info("step %d: %d validation image(s) written to %s", step, len(images), folder)
    return folder


def _require(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainingArgs.{name} must be {expected}, got {value!r}")


# ---------------------------------------------------------------- setup


def _flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)  # tensorboard hparams take scalars only
    return flat


def make_accelerator(args: TrainingArgs, project_name: str, config: Mapping[str, Any] | None = None) -> Accelerator:
    """An Accelerator for `args`: project dir = output_dir, our own `checkpoint-{step}` naming, trackers, seed.

    `config` (e.g. `config_to_dict(cfg)`) is recorded as the trackers' hyperparameters, flattened to `a.b` keys.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    project_config = ProjectConfiguration(
        project_dir=str(args.output_dir),
        logging_dir=str(Path(args.output_dir) / "logs"),
        automatic_checkpoint_naming=False,
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
        # Shuffle orders are a function of (seed, epoch), not of the global RNG, so that a resumed run skips into
        # the same order it left (load_state restores the RNG as it was after that epoch's shuffle was drawn).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.seed is not None:
        set_seed(args.seed)
    if args.report_to != "none":
        accelerator.init_trackers(project_name, config=_flat_hparams(config or {}))
    logger.info("%s: %d process(es), device %s, mixed precision %s", project_name, accelerator.num_processes,
                accelerator.device, args.mixed_precision)  # fmt: skip
    return accelerator


def write_resolved_config(cfg: Any, output_dir: str | Path, accelerator: Accelerator | None = None) -> Path:
    """Write `cfg` (a config dataclass) to `output_dir/config.yaml` on the main process; returns the path."""
    path = Path(output_dir) / "config.yaml"
    if accelerator is None or accelerator.is_main_process:
        save_config(cfg, path)
        logger.info("resolved config written to %s", path)
    return path


def loader_workers(args: TrainingArgs) -> int:
    """`args.dataloader_num_workers`, capped at the CPUs this process may use (a config made for a bigger machine
    still runs on a 2-core one, without DataLoader's warning); the cap is logged."""
    import os

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.dataloader_num_workers > available:
        logger.info("dataloader_num_workers=%d capped at the %d CPU(s) available", args.dataloader_num_workers,
                    available)  # fmt: skip
        return available
    return args.dataloader_num_workers


def start_training(cfg: Any, project_name: str) -> Accelerator:
    """The accelerator for a trainer's config ``cfg`` (its ``train`` block, ``cfg`` as the trackers' hyperparameters),
    with ``cfg`` written, resolved, to the output folder."""
    accelerator = make_accelerator(cfg.train, project_name, config=config_to_dict(cfg))
    write_resolved_config(cfg, cfg.train.output_dir, accelerator)
    return accelerator


def shuffled_loader(dataset: Any, args: TrainingArgs, collate_fn: Callable | None = None) -> Any:
    """The training DataLoader: shuffled (seeded through the accelerator), full batches when the data allows."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=loader_workers(args),
    )


def make_optimizer(params: Iterable[Any], args: TrainingArgs) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit when `args.use_8bit_adam`) over `params` (tensors or param groups)."""
    params = list(params)
    if not params:
        raise ValueError("params is empty: expected at least one trainable parameter (is everything frozen?)")
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError(
                "use_8bit_adam=True needs the bitsandbytes package (pip install bitsandbytes); "
                "set train.use_8bit_adam=false to use torch.optim.AdamW"
            ) from exc
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArgs, num_processes: int | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """`diffusers.optimization.get_scheduler` for `args.lr_scheduler` with warmup, sized in optimizer steps.

    After `accelerator.prepare` the scheduler is stepped once per process for each optimizer step, so warmup and
    total length are multiplied by `num_processes` (default: the current accelerate state's process count).
    """
    from accelerate import PartialState
    from diffusers.optimization import get_scheduler

    if num_processes is None:
        num_processes = PartialState().num_processes
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes!r}")
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


# ---------------------------------------------------------------- models


def frozen_weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen weights under the accelerator's mixed precision (fp16 / bf16 / fp32).

    On CPU the frozen weights stay float32 (autocast only): CPU autocast runs group_norm in the input's dtype, which
    fails on half weights next to float32 activations.
    """
    dtype = torch_dtype(accelerator.mixed_precision)
    if accelerator.device.type == "cpu" and dtype != torch.float32:
        logger.info(
            "mixed precision %s on CPU: frozen weights stay float32 (autocast only)", accelerator.mixed_precision
        )
        return torch.float32
    return dtype


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP/accelerate wrappers and `torch.compile`."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with `requires_grad`, in `model.parameters()` order."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only the trainable ones when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def cast_training_params(
    models: torch.nn.Module | Iterable[torch.nn.Module], dtype: torch.dtype = torch.float32
) -> None:
    """Cast the trainable parameters of `models` to `dtype` (fp32 master weights under fp16/bf16), in place."""
    if isinstance(models, torch.nn.Module):
        models = [models]
    for model in models:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)


def register_save_load_hooks(accelerator: Accelerator, models: Mapping[str, torch.nn.Module]) -> None:
    """Store each named model in checkpoints with `save_pretrained(checkpoint/<name>)`; load via `from_pretrained`.

    `models` maps a subfolder name to a model that will be (or was) passed to `accelerator.prepare` and whose
    class has `save_pretrained` and `from_pretrained(path, subfolder=...)` (diffusers ModelMixin, transformers
    PreTrainedModel). Loading copies the weights into the live model with strict key checking. Prepared models
    not named here are saved by accelerate as usual. Under DeepSpeed/FSDP accelerate saves the weights itself and
    the subfolders are an extra export.
    """
    for name, model in models.items():
        if not (hasattr(model, "save_pretrained") and hasattr(type(model), "from_pretrained")):
            raise TypeError(f"models[{name!r}] must have save_pretrained/from_pretrained, got {type(model).__name__}")

    def name_of(model: torch.nn.Module) -> str | None:
        plain = unwrap(accelerator, model)
        return next((name for name, target in models.items() if target is plain), None)

    def save_hook(prepared: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        aligned = len(weights) == len(prepared)  # False under DeepSpeed / FSDP: accelerate saved them already
        for i in reversed(range(len(prepared))):
            name = name_of(prepared[i])
            if name is None:
                continue
            if accelerator.is_main_process:
                unwrap(accelerator, prepared[i]).save_pretrained(Path(output_dir) / name)
            if aligned:
                weights.pop(i)

    def load_hook(prepared: list[torch.nn.Module], input_dir: str) -> None:
        for i in reversed(range(len(prepared))):
            name = name_of(prepared[i])
            if name is None:
                continue
            target = unwrap(accelerator, prepared.pop(i))
            if not (Path(input_dir) / name).is_dir():
                raise FileNotFoundError(
                    f"{input_dir}: checkpoint has no {name!r} subfolder for {type(target).__name__}"
                )
            loaded = type(target).from_pretrained(input_dir, subfolder=name)
            if hasattr(target, "register_to_config") and hasattr(loaded, "config"):
                target.register_to_config(**loaded.config)
            target.load_state_dict(loaded.state_dict(), strict=True)
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete `checkpoint-N` folders in `output_dir` as (N, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """Save the training state to `output_dir/checkpoint-{step}`. Every process must call this.

    The state is written to `checkpoint-{step}.partial` (collective under DeepSpeed) and renamed when all
    processes are done, so an interrupted save never looks like a checkpoint. The main process then deletes
    the oldest checkpoints beyond `total_limit`.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"total_limit must be an int >= 1 or None, got {total_limit!r}")
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from seesr.staging import replace_folder

        replace_folder(partial, final)  # fsync, then swap: an older checkpoint-{step} goes only once this is in place
        logger.info("saved checkpoint %s", final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problem(accelerator: Accelerator, path: str | Path) -> str | None:
    """Why the checkpoint folder `path` cannot be loaded (empty, missing or truncated files), or None.

    Checks without loading: every optimizer / scheduler / RNG state accelerate will read exists, torch-saved files
    are complete zip archives, and every safetensors file's header fits the file.
    """
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()]
    if not files:
        return "empty folder"
    expected = [f"optimizer{'' if i == 0 else f'_{i}'}.bin" for i in range(len(accelerator._optimizers))]
    expected += [f"scheduler{'' if i == 0 else f'_{i}'}.bin" for i in range(len(accelerator._schedulers))]
    expected.append(f"random_states_{accelerator.process_index}.pkl")
    for name in expected:
        if not (path / name).is_file():
            return f"{name} is missing"
    for file in files:
        try:
            if file.suffix in (".bin", ".pkl", ".pt", ".pth"):
                with zipfile.ZipFile(file):
                    pass
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
        except Exception as error:
            return f"{file.relative_to(path)} is unreadable ({str(error).splitlines()[0] if str(error) else error!r})"
    return None


def _load_latest(accelerator: Accelerator, output_dir: str | Path) -> int:
    """Load the newest loadable checkpoint-N (damaged ones are skipped with a warning); its step, or 0."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        logger.info("resume=latest: no checkpoint-N in %s, starting from step 0", output_dir)
        return 0
    for step, path in reversed(checkpoints):
        problem = checkpoint_problem(accelerator, path)
        if problem is None:
            try:
                logger.info("resuming from %s (step %d)", path, step)
                accelerator.load_state(str(path))
                return step
            except Exception as error:  # damage the checks above cannot see; an older load overwrites every state
                problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning("%s is damaged (%s); falling back to the next older checkpoint", path, problem)
    raise RuntimeError(f"resume=latest: no loadable checkpoint in {output_dir} (all {len(checkpoints)} damaged)")


def resume_step(accelerator: Accelerator, output_dir: str | Path, resume: str | Path | None) -> int:
    """Load the state of a checkpoint and return its step (0 when there is nothing to resume).

    `resume` is None (start fresh), "latest" (the highest loadable `output_dir/checkpoint-N`: a damaged one is
    skipped with a warning; step 0 with a log line when there is none) or the path of a `checkpoint-N` folder.
    """
    if resume is None:
        return 0
    if str(resume) == "latest":
        return _load_latest(accelerator, output_dir)
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume={str(resume)!r}: no such checkpoint folder")
        match = CHECKPOINT_PATTERN.match(path.name)
        if match is None:
            raise ValueError(f"resume={str(resume)!r}: expected 'latest' or a folder named checkpoint-<step>")
        step = int(match.group(1))
        problem = checkpoint_problem(accelerator, path)
        if problem is not None:
            raise ValueError(f"resume={str(resume)!r}: the checkpoint is damaged ({problem})")
    logger.info("resuming from %s (step %d)", path, step)
    accelerator.load_state(str(path))
    return step


# ---------------------------------------------------------------- logging


def log_step(
    accelerator: Accelerator, args: TrainingArgs, step: int, logs: Mapping[str, float | torch.Tensor]
) -> dict[str, float]:
    """Send `logs` to the trackers at `step`; every `args.logging_steps` also log them on the main process.

    Tensors are converted with `.item()`. Returns the float values (e.g. for a progress bar's postfix).
    """
    values = {k: float(v.detach().float().item()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
    accelerator.log(values, step=step)
    if step % args.logging_steps == 0 and accelerator.is_main_process:
        logger.info("step %d/%d: %s", step, args.max_train_steps, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    return values


def epoch_batches(accelerator: Accelerator, loader, step: int) -> Iterator[dict[str, Any]]:
    """Batches forever, starting where optimizer step ``step`` left off (epoch and position, after a resume)."""
    accumulation = accelerator.gradient_accumulation_steps
    epoch, skip = divmod(step * accumulation, max(len(loader), 1))
    while True:
        dataset = loader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def step_generator(device: torch.device, seed: int | None, step: int, process_index: int) -> torch.Generator:
    """The generator of every random draw of the step function (degradation, dropout, VAE sample, noise, t)."""
    return torch.Generator(device=device).manual_seed(((seed or 0) * 1_000_003 + step) * 1_009 + process_index)


def apply_gradients(
    accelerator: Accelerator,
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    max_grad_norm: float | None,
) -> None:
    """Backward, clip (on the synchronising micro-batch), optimizer and scheduler step; inside ``accumulate``."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def finish_step(
    accelerator: Accelerator,
    args: TrainingArgs,
    step: int,
    logs: Mapping[str, Any],
    lr_scheduler,
    progress,
    loss_keys: Iterable[str] = ("loss",),
) -> None:
    """After optimizer step ``step``: log (with the lr), fail on a non-finite loss (each of ``loss_keys``),
    checkpoint when due."""
    values = log_step(accelerator, args, step, {**logs, "lr": lr_scheduler.get_last_lr()[0]})
    progress.update(1)
    progress.set_postfix(loss=f"{values['loss']:.4f}")
    for key in loss_keys:
        if not math.isfinite(values[key]):
            raise RuntimeError(f"step {step}: the {key} is not finite ({values[key]})")
    if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)


# ---------------------------------------------------------------- the loop skeleton


@dataclass
class LossPhase:
    """A further (optimizer, parameters, loss) group of a `TrainingJob`, stepped after the job's own on every
    micro-batch, in the order given (e.g. OSEDiff's fake score, trained after its generator on the same batch).

    - ``params``: the parameters of this phase's own optimizer (`make_optimizer`, the same settings) and LR schedule
      (the job's ``make_lr_scheduler`` or `make_lr_scheduler`); gradient clipping covers the same list.
    - ``loss(models, batch, generator, terms) -> {name: tensor}``: ``terms`` holds what the earlier phases returned
      for this micro-batch (their loss terms and any tensors they hand on, e.g. a generator's detached output);
      the same step generator continues, so the phase's draws are part of the exact-resume sequence.
    - ``key``: the returned entry this phase minimises (and checks for finiteness); it is logged with the others.
    """

    params: list[torch.nn.Parameter]
    loss: Callable[
        [Mapping[str, torch.nn.Module], dict[str, Any], torch.Generator, Mapping[str, Any]], Mapping[str, torch.Tensor]
    ]
    key: str


@dataclass
class TrainingJob:
    """What a trainer supplies to `run_training`: its models, data, loss, export (and optional validation).

    - ``models``: the trained models by name. They are passed to ``accelerator.prepare`` in this order, handed
      (prepared, i.e. possibly DDP-wrapped) to ``loss`` and (unwrapped) to ``validate`` and ``export``, and stored
      in checkpoints by `register_save_load_hooks` unless ``checkpoint_hooks`` registers other hooks.
    - ``params``: the parameters the optimizer trains (gradient clipping covers the same list).
    - ``loader``: a DataLoader (shuffled by its sampler); `epoch_batches` resumes it into the same order/position.
    - ``loss(models, batch, generator) -> {"loss": total, ...other terms}``: runs under autocast; the generator
      (`step_generator`) is the only source of randomness of the step function.
    - ``export(models) -> Path``: called once, on the main process, after the last step.
    - ``export_dir``: what `run_training` returns on the other processes (the folder ``export`` writes).
    - ``validate(models, step)``: on the main process every ``validation_steps`` steps and after the last step.
    - ``make_lr_scheduler(optimizer)``: a schedule other than `make_lr_scheduler(optimizer, args)`.
    - ``description``: a short log line of what is trained (e.g. parameter counts), logged with the start step.
    - ``phases``: further `LossPhase` groups (own optimizer, schedule, loss), stepped after ``loss`` in order on
      every micro-batch. Their optimizers and schedules are prepared after the job's own and checkpointed as
      ``optimizer_1.bin``, ``scheduler_1.bin``, ... Logs hold every scalar term (number or 0-dim tensor) of every
      phase; other entries (tensors handed on to later phases) are not logged.
    """

    models: Mapping[str, torch.nn.Module]
    params: list[torch.nn.Parameter]
    loader: Any
    loss: Callable[[Mapping[str, torch.nn.Module], dict[str, Any], torch.Generator], Mapping[str, torch.Tensor]]
    export: Callable[[Mapping[str, torch.nn.Module]], Path]
    export_dir: Path
    validate: Callable[[Mapping[str, torch.nn.Module], int], None] | None = None
    validation_steps: int = 0
    make_lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    checkpoint_hooks: Callable[[Accelerator], None] | None = None
    description: str = ""
    phases: Sequence[LossPhase] = ()


def run_training(accelerator: Accelerator, args: TrainingArgs, job: TrainingJob) -> Path:
    """The training loop every trainer shares; returns the exported folder.

    Optimizer (`make_optimizer`) and LR schedule over ``job.params`` (and one each per ``job.phases``);
    ``accelerator.prepare``; resume from ``args.resume`` (`resume_step`). Then, per optimizer step: the next batches
    in the seeded, resumable order (`epoch_batches`); ``job.loss`` (then each phase's loss) under ``accumulate`` +
    ``autocast`` with the step's generator (`step_generator(seed, step, process)`, shared by the step's
    micro-batches and phases, so that a resumed run draws exactly what an uninterrupted run draws);
    `apply_gradients` after each; then `finish_step` (log, finite-loss check, checkpoint when due) and validation
    when due. At the end: ``wait_for_everyone``, ``job.export`` on the main process, ``wait_for_everyone`` and
    ``end_training``. ``accelerator`` comes from `start_training` (or `make_accelerator`).
    """
    from tqdm.auto import tqdm

    if job.checkpoint_hooks is not None:
        job.checkpoint_hooks(accelerator)
    else:
        register_save_load_hooks(accelerator, job.models)
    models, phases, loader = _prepare_job(accelerator, args, job)
    plain = {name: unwrap(accelerator, model) for name, model in models.items()}
    step = resume_step(accelerator, args.output_dir, args.resume)
    logger.info(
        "%s; %d training samples; starting at step %d", job.description or "training", len(loader.dataset), step
    )
    progress = tqdm(total=args.max_train_steps, initial=step, disable=not accelerator.is_local_main_process)
    batches = epoch_batches(accelerator, loader, step)
    generator = None
    while step < args.max_train_steps:
        if generator is None:  # one per optimizer step: a resumed run draws what the uninterrupted run drew
            generator = step_generator(accelerator.device, args.seed, step, accelerator.process_index)
        batch = next(batches)
        with accelerator.accumulate(*models.values()):
            terms: dict[str, Any] = {}
            for loss, key, params, optimizer, lr_scheduler in phases:
                with accelerator.autocast():
                    terms.update(loss(models, batch, generator, terms))
                apply_gradients(accelerator, terms[key], params, optimizer, lr_scheduler, args.max_grad_norm)
        if not accelerator.sync_gradients:
            continue
        step += 1
        generator = None
        logs = {k: v for k, v in terms.items() if isinstance(v, (int, float)) or torch.is_tensor(v) and v.ndim == 0}
        finish_step(accelerator, args, step, logs, phases[0][4], progress, [key for _, key, *_ in phases])
        due = job.validation_steps and (step % job.validation_steps == 0 or step == args.max_train_steps)
        if job.validate is not None and due:
            if accelerator.is_main_process:
                job.validate(plain, step)
            accelerator.wait_for_everyone()
    progress.close()
    accelerator.wait_for_everyone()
    export_dir = job.export_dir
    if accelerator.is_main_process:
        export_dir = job.export(plain)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return Path(export_dir)


def _prepare_job(accelerator: Accelerator, args: TrainingArgs, job: TrainingJob) -> tuple[dict, list[tuple], Any]:
    """Optimizers and schedules of the job and its phases, everything through ``accelerator.prepare`` (models,
    optimizers, loader, schedules: for a one-phase job the order of ``prepare(model..., optimizer, loader,
    scheduler)``). Returns the prepared models by name, ``(loss, key, params, optimizer, scheduler)`` per phase
    (the job's own first) and the loader."""
    groups = [(lambda models, batch, generator, terms: job.loss(models, batch, generator), "loss", job.params)]
    groups += [(phase.loss, phase.key, phase.params) for phase in job.phases]
    optimizers = [make_optimizer(params, args) for _, _, params in groups]
    schedule = job.make_lr_scheduler or (lambda optimizer: make_lr_scheduler(optimizer, args))
    schedulers = [schedule(optimizer) for optimizer in optimizers]
    names, count = list(job.models), len(groups)
    prepared = accelerator.prepare(*job.models.values(), *optimizers, job.loader, *schedulers)
    models = dict(zip(names, prepared[: len(names)], strict=True))
    optimizers = prepared[len(names) : len(names) + count]
    loader = prepared[len(names) + count]
    schedulers = prepared[len(names) + count + 1 :]
    phases = [(*group, o, s) for group, o, s in zip(groups, optimizers, schedulers, strict=True)]
    return models, phases, loader
