"""`seesr tag`: tags for images, printed or written as <name>.txt files."""

import pytest
import torch
from PIL import Image
from tiny_dape import tiny_dape

from dape import DAPEModel
from seesr.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dape")
    tiny_dape(seed=2).save_pretrained(path)
    return path


def _image(path, size, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return [
        _image(folder / "a.png", (40, 30), 0),
        _image(folder / "b.jpg", (20, 50), 1),
        _image(folder / "c.png", (64, 64), 2),
    ]


def _expected(model_dir, paths):
    model = DAPEModel.from_pretrained(model_dir)
    return {str(p): model.tags(model.preprocess([Image.open(p).convert("RGB")]))[0] for p in paths}


def test_prints_path_and_tags(model_dir, images, capsys):
    assert main(["tag", str(images[0].parent), "--model", str(model_dir), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = dict(line.split("\t") for line in lines)
    assert printed == _expected(model_dir, images)
    assert any(printed.values())  # the tiny model tags something


def test_writes_text_files(model_dir, images, tmp_path, capsys):
    out_dir = tmp_path / "tags"
    assert main(["tag", *map(str, images), "--model", str(model_dir), "--out-dir", str(out_dir)]) == 0
    assert capsys.readouterr().out == ""
    expected = _expected(model_dir, images)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.txt", "b.txt", "c.txt"]
    for image in images:
        assert (out_dir / f"{image.stem}.txt").read_text(encoding="utf-8") == expected[str(image)] + "\n"


def test_bad_inputs_are_reported_per_file(model_dir, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    same_stem = _image(tmp_path / "a.png", (16, 16), 5)
    out_dir = tmp_path / "tags"
    argv = [str(images[0]), str(broken), str(tmp_path / "missing.png"), str(same_stem), str(images[1])]
    assert main(["tag", *argv, "--model", str(model_dir), "--out-dir", str(out_dir)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3
    assert any("missing.png" in line for line in errors)
    assert any(str(broken) in line for line in errors)
    assert any(str(same_stem) in line and "a.txt" in line for line in errors)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.txt", "b.txt"]


def test_missing_model_folder(images, tmp_path, capsys):
    assert main(["tag", str(images[0]), "--model", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["nonsense", *([] if torch.cuda.is_available() else ["cuda"])])
def test_bad_device(model_dir, images, device, capsys):
    assert main(["tag", str(images[0]), "--model", str(model_dir), "--device", device]) == 2
    assert "--device" in capsys.readouterr().err


def test_half_precision_option(model_dir, images, capsys):
    assert main(["tag", str(images[0]), "--model", str(model_dir), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    path, _ = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(images[0])


def test_pipeline_folder_as_model_and_overwrite(model_dir, images, tmp_path, capsys):
    """--model takes a SeeSR pipeline folder (its prompt_extractor/); -o keeps existing files unless --overwrite."""
    from tiny import tiny_pipeline

    pipeline_dir = tmp_path / "pipeline"
    tiny_pipeline(prompt_extractor=DAPEModel.from_pretrained(model_dir)).save_pretrained(pipeline_dir)
    out = tmp_path / "tags"
    assert main(["tag", str(images[0]), "--model", str(pipeline_dir), "-o", str(out)]) == 0
    expected = _expected(model_dir, images)[str(images[0])] + "\n"
    assert (out / "a.txt").read_text(encoding="utf-8") == expected
    (out / "a.txt").write_text("edited by hand\n", encoding="utf-8")
    assert main(["tag", str(images[0]), "--model", str(pipeline_dir), "-o", str(out)]) == 0
    assert (out / "a.txt").read_text(encoding="utf-8") == "edited by hand\n"
    assert main(["tag", str(images[0]), "--model", str(pipeline_dir), "-o", str(out), "--overwrite"]) == 0
    assert (out / "a.txt").read_text(encoding="utf-8") == expected
