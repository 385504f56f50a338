from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
from PIL import Image

from seesr import cli
from seesr.metrics import PyiqaMetric, psnr, remove_border, rgb_to_y, ssim


def _image(seed: int = 0, size: tuple[int, int] = (32, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 220, (*size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "rgb, y",
    [
        ((0, 0, 0), 16.0),
        ((255, 255, 255), 235.0),
        ((255, 0, 0), 16 + 65.481),
        ((0, 255, 0), 16 + 128.553),
        ((0, 0, 255), 16 + 24.966),
    ],
)
def test_y_of_pure_colours(rgb, y):
    image = np.full((2, 3, 3), rgb, dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(image), y, rtol=0, atol=1e-9)


def test_psnr_constant_offset_by_hand():
    gt = np.full((16, 16, 3), 100, np.uint8)
    pred = gt + 10
    # RGB: MSE = 100.  Y: every channel +10 moves Y by 10 * (65.481 + 128.553 + 24.966) / 255 = 10 * 219/255.
    assert psnr(pred, gt, y_channel=False) == pytest.approx(10 * math.log10(255**2 / 100))
    dy = 10 * 219 / 255
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(255**2 / dy**2))


def test_identical_images():
    image = _image()
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert ssim(image, image, y_channel=False) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_noise():
    gt = _image().astype(np.float64)
    rng = np.random.default_rng(1)
    scores = []
    for sigma in (2, 8, 32):
        noisy = np.clip(gt + rng.normal(0, sigma, gt.shape), 0, 255)
        scores.append(ssim(noisy, gt))
    assert 1 > scores[0] > scores[1] > scores[2] > 0


def test_ssim_matches_scikit_image_gaussian_reference():
    metrics = pytest.importorskip("skimage.metrics")
    pred, gt = _image(1, (24, 30)), _image(2, (24, 30))
    y_pred, y_gt = rgb_to_y(pred), rgb_to_y(gt)
    expected = metrics.structural_similarity(
        y_pred, y_gt, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(pred, gt) == pytest.approx(expected, abs=1e-10)


def test_crop_border_honoured():
    gt = _image()
    pred = gt.copy()
    pred[:3] = 0  # damage only the top 3 rows
    assert psnr(pred, gt, crop_border=2) < 100
    assert psnr(pred, gt, crop_border=3) == math.inf
    assert ssim(pred, gt, crop_border=3) == pytest.approx(1.0)
    assert remove_border(gt, 4).shape == (24, 32, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: psnr(_image(size=(8, 8)), _image(size=(8, 9))), "same size"),
        (lambda: psnr(_image(), _image(), crop_border=-1), "crop_border must be an int >= 0"),
        (lambda: psnr(_image(), _image(), crop_border=16), "leaves nothing"),
        (lambda: ssim(_image(size=(10, 20)), _image(size=(10, 20))), "at least 11x11"),
        (lambda: psnr(_image()[..., 0], _image()[..., 0]), r"shape \(H, W, 3\)"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(importlib.util.find_spec("pyiqa") is not None, reason="pyiqa is installed")
def test_pyiqa_missing_error_names_extra_and_licence():
    with pytest.raises(ImportError, match="lpips.*pyiqa.*non-commercial"):
        PyiqaMetric("lpips")


# ---------------------------------------------------------------- CLI


def _evaluate(monkeypatch, argv: list[str]) -> int:
    # Only this sub-command is registered, so the test does not import the other commands' heavy modules.
    monkeypatch.setattr(cli, "COMMANDS", {"evaluate": "seesr.cli.evaluate"})
    return cli.main(["evaluate", *argv])


def test_cli_folder_pair_with_missing_and_mismatch(tmp_path, monkeypatch, caplog):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    gt_a, gt_b = _image(1), _image(2)
    Image.fromarray(gt_a).save(gt_dir / "a.png")
    Image.fromarray(gt_a).save(pred_dir / "a.png")  # identical -> inf
    Image.fromarray(gt_b).save(gt_dir / "b.png")
    Image.fromarray(np.clip(gt_b.astype(int) + 10, 0, 255).astype(np.uint8)).save(pred_dir / "b.png")
    Image.fromarray(_image(3)).save(gt_dir / "c.png")  # no prediction
    Image.fromarray(_image(4, (20, 20))).save(gt_dir / "d.png")
    Image.fromarray(_image(4, (40, 40))).save(pred_dir / "d.png")  # size mismatch
    out, table = tmp_path / "res" / "results.json", tmp_path / "res" / "results.csv"

    code = _evaluate(
        monkeypatch,
        ["--pred", str(pred_dir), "--gt", str(gt_dir), "--crop-border", "2", "--out", str(out), "--csv", str(table)],
    )
    assert code == 1
    assert "no prediction with stem 'c'" in caplog.text and "differs from ground truth" in caplog.text

    results = json.loads(out.read_text())
    assert [r["name"] for r in results["images"]] == ["a", "b"] and results["count"] == 2
    assert results["images"][0]["psnr"] == "inf" and results["images"][0]["ssim"] == pytest.approx(1.0)
    expected_b = psnr(np.asarray(Image.open(pred_dir / "b.png")), gt_b, crop_border=2)
    assert results["images"][1]["psnr"] == pytest.approx(expected_b)
    assert len(results["errors"]) == 2
    settings = results["settings"]
    assert settings["crop_border"] == 2 and settings["y_channel"] is True and settings["metrics"] == ["psnr", "ssim"]
    assert "numpy" in settings["versions"]

    rows = list(csv.reader(table.open()))
    assert rows[0] == ["name", "psnr", "ssim"] and [r[0] for r in rows[1:]] == ["a", "b", "mean"]
    assert json.loads((tmp_path / "res" / "results.settings.json").read_text())["crop_border"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.csv", "results.json", "results.settings.json"]


def test_cli_clean_run_and_usage_errors(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_image()).save(folder / "x.png")
    assert _evaluate(monkeypatch, ["--pred", str(folder), "--gt", str(folder), "--metrics", "psnr"]) == 0
    assert _evaluate(monkeypatch, ["--pred", str(folder), "--gt", str(folder), "--metrics", "psnr,fid"]) == 2
    assert "unknown metric 'fid'" in caplog.text
    assert _evaluate(monkeypatch, ["--pred", str(tmp_path / "nope"), "--gt", str(folder)]) == 2
    assert "nope: no such folder" in caplog.text
    out = tmp_path / "r.json"
    if importlib.util.find_spec("pyiqa") is None:
        args = ["--pred", str(folder), "--gt", str(folder), "--metrics", "psnr,lpips", "--out", str(out)]
        assert _evaluate(monkeypatch, args) == 2
        assert "non-commercial" in caplog.text and not out.exists()
