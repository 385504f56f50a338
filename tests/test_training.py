from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from seesr.training.config import load_config
from seesr.training.loop import (
    TrainingArgs,
    cast_training_params,
    count_parameters,
    list_checkpoints,
    log_step,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    register_save_load_hooks,
    resume_step,
    save_checkpoint,
    trainable_parameters,
    unwrap,
    write_resolved_config,
)


class Toy(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.frozen = nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(x)))


@dataclass
class StageConfig:
    data: str = "pairs/"
    train: TrainingArgs = field(default_factory=TrainingArgs)


def _args(tmp_path, **overrides) -> TrainingArgs:
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        learning_rate=0.05,
        lr_scheduler="constant_with_warmup",  # independent of max_train_steps, so 3 + 2 steps == 5 steps
        lr_warmup_steps=1,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        logging_steps=1,
        seed=0,
    )
    return TrainingArgs(**{**base, **overrides})


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True)


def _train(args: TrainingArgs) -> tuple[Toy, torch.optim.Optimizer, int]:
    """The reference stage loop (the building blocks of seesr.training.loop), on a toy model."""
    accelerator = make_accelerator(args, "toy")
    torch.manual_seed(123 if args.resume else 0)  # a resumed run starts from different weights on purpose
    model = Toy()
    register_save_load_hooks(accelerator, {"toy": model})
    optimizer = make_optimizer(trainable_parameters(model), args)
    scheduler = make_lr_scheduler(optimizer, args)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = resume_step(accelerator, args.output_dir, args.resume)
    while step < args.max_train_steps:
        with accelerator.accumulate(model):
            x, y = _batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            log_step(accelerator, args, step, {"loss": loss, "lr": scheduler.get_last_lr()[0]})
            if step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    accelerator.end_training()
    return unwrap(accelerator, model), optimizer, step


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_checkpoint_prune_resume(tmp_path):
    # Uninterrupted reference: 5 steps.
    ref_model, ref_optimizer, _ = _train(_args(tmp_path / "ref", max_train_steps=5))

    # Interrupted run: 3 steps, one checkpoint per step, at most 2 kept.
    torch.manual_seed(0)
    initial = _state(Toy())
    run = tmp_path / "run"
    model, _, step = _train(_args(run, max_train_steps=3))
    assert step == 3
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert not list(run.glob("*.partial"))
    after = _state(model)
    for key in initial:
        changed = not torch.equal(initial[key], after[key])
        assert changed == key.startswith("head."), key

    # The save hook wrote a loadable save_pretrained subfolder instead of accelerate's model file.
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / "toy" / "config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    assert (checkpoint / "optimizer.bin").is_file()
    reloaded = Toy.from_pretrained(checkpoint, subfolder="toy")
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=0)

    # Resume from latest (3) with fresh weights, continue to 5: same result as the uninterrupted run,
    # which needs the model, optimizer and scheduler state all restored.
    resumed, resumed_optimizer, step = _train(_args(run, max_train_steps=5, resume="latest"))
    assert step == 5
    assert [s for s, _ in list_checkpoints(run)] == [4, 5]
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, ref_model.state_dict()[key])
    ref_states = list(ref_optimizer.state_dict()["state"].values())
    for i, state in enumerate(resumed_optimizer.state_dict()["state"].values()):
        assert state["step"] == ref_states[i]["step"] == 5
        torch.testing.assert_close(state["exp_avg"], ref_states[i]["exp_avg"])

    # Resume by explicit path; bad paths are clear errors; latest with nothing present starts at 0.
    accelerator = make_accelerator(_args(run), "toy")
    model = Toy()
    register_save_load_hooks(accelerator, {"toy": model})
    optimizer = make_optimizer(trainable_parameters(model), _args(run))
    model, optimizer = accelerator.prepare(model, optimizer)
    assert resume_step(accelerator, run, str(run / "checkpoint-4")) == 4
    torch.testing.assert_close(unwrap(accelerator, model).head.weight, reloaded_weight(run / "checkpoint-4"))
    with pytest.raises(FileNotFoundError, match="checkpoint-99"):
        resume_step(accelerator, run, str(run / "checkpoint-99"))
    with pytest.raises(ValueError, match="expected 'latest' or a folder named checkpoint-<step>"):
        resume_step(accelerator, run, str(run / "checkpoint-4" / "toy"))
    assert resume_step(accelerator, tmp_path / "empty", "latest") == 0
    assert resume_step(accelerator, run, None) == 0


def reloaded_weight(checkpoint) -> torch.Tensor:
    return Toy.from_pretrained(checkpoint, subfolder="toy").head.weight


def test_training_args_validation_and_config_block(tmp_path):
    with pytest.raises(ValueError, match="TrainingArgs.max_train_steps must be an int >= 1, got 0"):
        TrainingArgs(max_train_steps=0)
    with pytest.raises(ValueError, match="adam_beta2"):
        TrainingArgs(adam_beta2=1.0)
    cfg = load_config(StageConfig, None, ["train.mixed_precision=bf16", "train.learning_rate=1e-4"])
    assert cfg.train.mixed_precision == "bf16" and cfg.train.learning_rate == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="train.mixed_precision"):
        load_config(StageConfig, None, ["train.mixed_precision=fp8"])
    path = write_resolved_config(cfg, tmp_path / "out")
    assert load_config(StageConfig, path, []) == cfg


def test_optimizer_and_scheduler(tmp_path):
    model = Toy()
    args = _args(tmp_path, lr_scheduler="constant_with_warmup", lr_warmup_steps=2, adam_weight_decay=0.0)
    optimizer = make_optimizer(trainable_parameters(model), args)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.0
    scheduler = make_lr_scheduler(optimizer, args, num_processes=2)
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.0125, 0.025, 0.0375, 0.05])  # warmup 2 steps x 2 processes
    with pytest.raises(ValueError, match="params is empty"):
        make_optimizer([], args)


def test_8bit_adam_without_bitsandbytes(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="use_8bit_adam=True needs the bitsandbytes package"):
        make_optimizer(Toy().parameters(), _args(tmp_path, use_8bit_adam=True))


def test_parameter_helpers(tmp_path, caplog):
    model = Toy(width=4)
    assert count_parameters(model) == 4 * 4 + 4 + 4 + 1
    assert count_parameters(model, trainable_only=True) == 4 + 1
    model.to(torch.bfloat16)
    cast_training_params(model, torch.float32)
    assert model.head.weight.dtype == torch.float32 and model.frozen.weight.dtype == torch.bfloat16

    accelerator = make_accelerator(_args(tmp_path), "toy")
    assert unwrap(accelerator, torch.compile(model)) is model
    with caplog.at_level(logging.INFO, logger="seesr.training.loop"):
        values = log_step(accelerator, _args(tmp_path, logging_steps=2), 4, {"loss": torch.tensor(0.5), "lr": 1})
    assert values == {"loss": 0.5, "lr": 1.0}
    assert "step 4/10000: loss=0.5, lr=1" in caplog.text
    with pytest.raises(TypeError, match="save_pretrained"):
        register_save_load_hooks(accelerator, {"plain": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="total_limit"):
        save_checkpoint(accelerator, tmp_path, 1, 0)


DDP_SCRIPT = """
import json, sys
import torch
from tests.test_training import Toy
from seesr.training.loop import (TrainingArgs, make_accelerator, make_lr_scheduler, make_optimizer,
    register_save_load_hooks, resume_step, save_checkpoint, trainable_parameters, unwrap)

out = sys.argv[1]
args = TrainingArgs(output_dir=out, report_to="none", checkpointing_steps=1, checkpoints_total_limit=1,
                    max_train_steps=2, learning_rate=0.05, seed=0)
accelerator = make_accelerator(args, "ddp")
torch.manual_seed(0)
model = Toy()
register_save_load_hooks(accelerator, {"toy": model})
optimizer = make_optimizer(trainable_parameters(model), args)
scheduler = make_lr_scheduler(optimizer, args)
model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
for step in (1, 2):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(10 * step + accelerator.process_index))
    accelerator.backward(model(x).pow(2).mean())
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    save_checkpoint(accelerator, out, step, args.checkpoints_total_limit)
trained = unwrap(accelerator, model).head.weight.detach().clone()
with torch.no_grad():
    unwrap(accelerator, model).head.weight.zero_()
step = resume_step(accelerator, out, "latest")
ok = step == 2 and torch.equal(unwrap(accelerator, model).head.weight, trained)
with open(f"{out}/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"world": accelerator.num_processes, "ok": ok, "step": step}, f)
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_two_process_checkpoint_and_resume(tmp_path):
    """Two CPU processes (gloo): every rank calls save_checkpoint; the rename and pruning happen once."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(out)]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks == [{"world": 2, "ok": True, "step": 2}] * 2
    assert [s for s, _ in list_checkpoints(out)] == [2] and not list(out.glob("*.partial"))
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (checkpoint / "toy" / "config.json").is_file()
