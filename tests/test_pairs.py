from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import seesr.cli
from seesr.data.degradation import DegradationConfig
from seesr.data.pairs import make_pairs


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "b.jpg")  # padded
    (folder / "c.png").write_bytes(b"\x89PNG broken")
    return folder


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    # Only this sub-command: the others may live in modules this test does not need.
    monkeypatch.setattr(seesr.cli, "COMMANDS", {"make-pairs": "seesr.cli.make_pairs"})
    return seesr.cli.main


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: Image.open(p).size for p in sorted(folder.glob("*.png"))}


def test_command_writes_pairs_and_reports_the_broken_file(inputs, tmp_path, cli, caplog):
    out = tmp_path / "pairs"
    with caplog.at_level(logging.ERROR):
        code = cli(["make-pairs", str(inputs), "-o", str(out), "--resolution", "32", "--device", "cpu"])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "c.png" in errors[0]
    assert _sizes(out / "gt") == {"a.png": (32, 32), "b.png": (32, 32)}
    assert _sizes(out / "lq") == {"a.png": (8, 8), "b.png": (8, 8)}
    assert _sizes(out / "sr_bicubic") == {"a.png": (32, 32), "b.png": (32, 32)}
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    saved = yaml.safe_load((out / "degradation.yaml").read_text())
    assert DegradationConfig.from_dict(saved["degradation"]) == DegradationConfig()


def test_scale_option_and_reproducible_output(inputs, tmp_path, cli):
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        assert cli(["make-pairs", str(inputs / "a.png"), "-o", str(out), "--resolution", "16", "--scale", "2"]) == 0
        assert _sizes(out / "lq") == {"a.png": (8, 8)}
        runs.append(np.asarray(Image.open(out / "lq" / "a.png")))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_bad_arguments_give_one_line_and_exit_2(inputs, tmp_path, cli, caplog):
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("degradation:\n  jpeg_range: [95, 30]\n")
    with caplog.at_level(logging.ERROR):
        assert cli(["make-pairs", str(inputs), "-o", str(tmp_path / "x"), "--config", str(bad_config)]) == 2
        assert cli(["make-pairs", str(inputs), "-o", str(tmp_path / "y"), "--resolution", "30"]) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("jpeg_range" in m for m in messages) and any("resolution=30" in m for m in messages)


def test_library_function_resizes_lq_back_when_configured(inputs, tmp_path):
    config = DegradationConfig(resize_lq_to_gt=True, usm_sharpen_gt=False)
    result = make_pairs([inputs / "a.png", inputs / "a.png"], tmp_path / "o", config, resolution=16, progress=False)
    assert result.written == ["a"] and result.errors == []  # duplicates are expanded once
    assert _sizes(tmp_path / "o" / "lq") == {"a.png": (16, 16)}


def test_inputs_sharing_a_name_get_distinct_outputs(inputs, tmp_path):
    (inputs / "x").mkdir()
    Image.open(inputs / "a.png").save(inputs / "x" / "a.png")
    result = make_pairs([inputs / "a.png", inputs / "x"], tmp_path / "o", resolution=16, progress=False)
    assert result.written == ["a", "a_1"]
    assert set(_sizes(tmp_path / "o" / "gt")) == {"a.png", "a_1.png"}
