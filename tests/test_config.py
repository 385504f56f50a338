from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from seesr.training.config import ConfigError, config_to_dict, load_config, save_config


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    resume: str | None = None
    precision: Literal["no", "fp16", "bf16"] = "no"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    max_side: int | None = None
    tags: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = (64,)
    out: Path = Path("out")
    weights: dict[str, float] = field(default_factory=dict)
    flag: bool = False
    train: Inner = field(default_factory=Inner)


def _yaml(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_without_file():
    assert load_config(Outer, None, []) == Outer()


def test_file_and_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        "name: a\nsteps: 3\ntags: [x, y]\nsizes: [1, 2, 3]\nout: /tmp/o\nweights: {a: 1}\n"
        "train:\n  lr: 1e-3\n  betas: [0.5, 0.6]\n",
    )
    cfg = load_config(Outer, path, ["steps=5", "train.precision=bf16", "train.resume=latest", "max_side=512"])
    assert cfg.name == "a" and cfg.steps == 5 and cfg.tags == ["x", "y"] and cfg.sizes == (1, 2, 3)
    assert cfg.out == Path("/tmp/o") and cfg.weights == {"a": 1.0} and isinstance(cfg.weights["a"], float)
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.betas == (0.5, 0.6)
    assert cfg.train.precision == "bf16" and cfg.train.resume == "latest" and cfg.max_side == 512


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(Outer, None, ["train.lr=1", "max_side=null", "train.resume=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.max_side is None and cfg.train.resume is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("stepz=3", "stepz"),
        ("train.lrr=3", "train.lrr"),
        ("steps=abc", "steps"),
        ("steps=1.5", "steps"),
        ("steps=true", "steps"),
        ("flag=1", "flag"),
        ("max_side=big", "max_side"),
        ("tags=[1, 2]", r"tags\[0\]"),
        ("train.betas=[0.1]", "train.betas"),
        ("train.betas=[0.1, x]", r"train.betas\[1\]"),
        ("train.precision=fp8", "train.precision"),
        ("train=3", "train"),
        ("train.lr=abc", "train.lr"),
        ("name.sub=3", "name"),
        ("novalue", "novalue"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^(override )?'?{key}"):
        load_config(Outer, None, [override])


def test_unknown_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.warmup: unknown key; valid keys: \['betas'"):
        load_config(Outer, _yaml(tmp_path, {"train": {"warmup": 3}}), [])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Outer, _yaml(tmp_path, "a: [1,\n"), [])
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, _yaml(tmp_path, "- 1\n- 2\n"), [])
    with pytest.raises(TypeError, match="dataclass"):
        load_config(dict, None, [])


def test_post_init_runs():
    with pytest.raises(ValueError, match="lr must be > 0"):
        load_config(Outer, None, ["train.lr=-1"])


def test_required_field_missing():
    @dataclass
    class Needs:
        data_dir: str

    with pytest.raises(ConfigError, match="^data_dir: required key is missing"):
        load_config(Needs, None, [])
    assert load_config(Needs, None, ["data_dir=/d"]).data_dir == "/d"


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(Outer, None, ["tags=[a]", "sizes=[8, 16]", "train.betas=[0.1, 0.2]", "out=x/y"])
    assert config_to_dict(cfg)["train"]["betas"] == [0.1, 0.2]
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Outer, tmp_path / "run" / "config.yaml", []) == cfg
    with pytest.raises(TypeError, match="dataclass instance"):
        config_to_dict(Outer)
