"""What the trainer tests share: the `key=value` overrides of a tiny run, the config-error check and the
two-process `accelerate launch` run.

Every trainer test runs its config file with the same tiny settings (the tiny SD2 / DAPE folders and HR images of
`tiny_training`, 32 px crops, batch 2, float32, no trackers); `tiny_run_overrides` writes them, a test adds its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny_training import ENV, ROOT

from seesr.training.config import ConfigError, load_config
from seesr.training.loop import list_checkpoints


def tiny_run_overrides(inputs: dict[str, Path], out: Path, steps: int = 2, **items: Any) -> list[str]:
    """``key=value`` overrides of a tiny CPU run of ``steps`` steps into ``out``; ``items`` add or replace keys."""
    models = {"pretrained_model": inputs["sd"], "dape_model": inputs["dape"]}
    data = {"data.train_data": inputs["hr"], "data.resolution": 32}
    train = dict(output_dir=out, max_train_steps=steps, train_batch_size=2, mixed_precision="'no'", report_to="none")
    merged = {**models, **data, **{f"train.{key}": value for key, value in train.items()}, **items}
    return [f"{key}={value}" for key, value in merged.items()]


def assert_config_error(config_class: type, config: Path, items: list[str], match: str) -> None:
    """Loading ``config`` with the overrides ``items`` fails at load time with a message matching ``match``."""
    with pytest.raises((ValueError, ConfigError), match=match):
        load_config(config_class, config, items)


def launch_two_processes(script: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real launcher on two CPU processes (gloo): ``accelerate launch --multi_gpu --num_processes 2`` of the
    checkout's ``script`` with ``ACCELERATE_USE_CPU``."""
    flags = ["--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, str(ROOT / script), *args]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def only_checkpoint(result: subprocess.CompletedProcess, out: Path, step: int) -> Path:
    """The run succeeded on 2 processes and left exactly ``checkpoint-{step}`` (no partial one) holding both ranks'
    RNG states; returns its path."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    checkpoints = list_checkpoints(out)
    assert [s for s, _ in checkpoints] == [step], checkpoints
    assert not list(out.glob("*.partial"))
    states = {p.name for p in checkpoints[0][1].glob("random_states_*.pkl")}
    assert states == {"random_states_0.pkl", "random_states_1.pkl"}
    return checkpoints[0][1]
