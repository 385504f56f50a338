"""`seesr upscale` with a tiny SeeSR pipeline folder: outputs, bad inputs, atomic writes, two processes."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import lq_image

from seesr.cli import main


def upscale(model_dir, inputs, out, *extra):
    args = [
        "upscale",
        *map(str, inputs),
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--upscale",
        "4",
        "--process-size",
        "64",
    ]
    return main(args + list(extra))


def test_outputs_and_prompts(model_dir, tmp_path):
    lq_image(16, 16).save(tmp_path / "a.png")
    sub = tmp_path / "folder"
    sub.mkdir()
    lq_image(12, 20, seed=3).save(sub / "b.jpg")
    out = tmp_path / "out"
    assert upscale(model_dir, [tmp_path / "a.png", sub], out, "--save-prompts", "--prompt", "a cat") == 0
    assert Image.open(out / "a.png").size == (64, 64) and Image.open(out / "b.png").size == (48, 80)
    assert (out / "a.txt").read_text() == "a cat,clean, high-resolution, 8k\n"
    first = np.asarray(Image.open(out / "a.png"))
    assert upscale(model_dir, [tmp_path / "a.png"], out) == 0  # exists: skipped, untouched
    assert upscale(model_dir, [tmp_path / "a.png"], out, "--overwrite", "--seed", "7") == 0
    assert not np.array_equal(first, np.asarray(Image.open(out / "a.png")))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _write_bad_and_odd_inputs(folder):
    folder.mkdir()
    lq_image(16, 16).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    lq_image(64, 64).save(folder / "huge.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "pixel.png")
    lq_image(16, 16).convert("L").save(folder / "gray.png")
    rgba = lq_image(16, 16).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((16, 16)))
    rgba.save(folder / "alpha.png")
    lq_image(16, 16).convert("P").save(folder / "palette.png")
    Image.fromarray(np.asarray(lq_image(16, 16).convert("L"), dtype=np.uint16) * 257).save(folder / "deep.png")
    lq_image(16, 16).convert("CMYK").save(folder / "cmyk.jpg")
    rotated = lq_image(16, 8)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "rotated.jpg", exif=exif)


def test_bad_inputs_do_not_stop_the_batch(model_dir, tmp_path, caplog):
    inputs = tmp_path / "in"
    _write_bad_and_odd_inputs(inputs)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = upscale(model_dir, [inputs, tmp_path / "missing.png"], out, "--max-pixels", "2000")
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for name in ("empty.png", "notes.png", "truncated.png", "huge.png", "missing.png"):
        assert sum(name in e for e in errors) == 1, (name, errors)
        assert not (out / name).exists()
    assert all(len(e.splitlines()) == 1 for e in errors)
    for name in ("good", "pixel", "gray", "alpha", "palette", "deep", "cmyk", "rotated"):
        assert (out / f"{name}.png").exists(), name
    assert Image.open(out / "pixel.png").size == (4, 4)
    assert Image.open(out / "rotated.png").size == (32, 64)  # EXIF orientation applied: 16x8 shown as 8x16
    alpha = Image.open(out / "alpha.png")
    assert alpha.mode == "RGBA" and alpha.size == (64, 64) and np.asarray(alpha)[..., 3].std() > 10
    assert Image.open(out / "deep.png").mode == "I;16"  # 16-bit grey in, 16-bit grey out
    assert Image.open(out / "gray.png").mode == "L" and Image.open(out / "palette.png").mode == "RGB"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unwritable_output_and_invalid_numbers(model_dir, tmp_path, caplog):
    lq_image(16, 16).save(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.ERROR):
        assert upscale(model_dir, [tmp_path / "a.png"], blocker / "out") == 1
    assert any("not writable" in r.getMessage() for r in caplog.records)
    for bad in (["--steps", "0"], ["--upscale", "0.5"], ["--guidance-scale", "abc"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            upscale(model_dir, [tmp_path / "a.png"], tmp_path / "o", *bad)
        assert exit_info.value.code == 2


def test_two_processes_split_the_inputs(model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        lq_image(16, 16, seed=i).save(inputs / f"img{i}.png")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29513",
        "-m",
        "seesr.cli",
        "-v",
        "upscale",
        str(inputs),
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(model_dir),
        "--steps",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [line for line in result.stderr.splitlines() if " -> " in line and "(process " in line]
    assert sorted(line.split(" -> ")[0].split()[-1] for line in written) == sorted(str(p) for p in inputs.iterdir())
    assert {line.rsplit("(process ", 1)[1] for line in written} == {"0)", "1)"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"img{i}.png" for i in range(5)]


def test_embedded_default_model(tmp_path, caplog):
    """No --model: the bundled TGSR model, announced in one log line; tiny and RGBA inputs handled."""
    Image.open(Path(__file__).parents[1] / "examples" / "astronaut.png").crop((40, 20, 72, 44)).save(
        tmp_path / "crop.png"
    )
    Image.new("RGBA", (1, 1), (90, 40, 200, 100)).save(tmp_path / "dot.png")
    with caplog.at_level(logging.INFO):
        code = main(
            [
                "upscale",
                str(tmp_path / "crop.png"),
                str(tmp_path / "dot.png"),
                "-o",
                str(tmp_path / "out"),
                "--prompt",
                "an astronaut",
            ]
        )
    assert code == 0
    assert sum("embedded default model" in r.getMessage() for r in caplog.records) == 1
    assert Image.open(tmp_path / "out" / "crop.png").size == (128, 96)
    dot = Image.open(tmp_path / "out" / "dot.png")
    assert dot.size == (4, 4) and dot.mode == "RGBA" and dot.getpixel((1, 1))[3] == 100
    assert main(["upscale", str(tmp_path / "crop.png"), "-o", str(tmp_path / "o2"), "--upscale", "3"]) == 2
