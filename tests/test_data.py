from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from seesr.data.image_folder import ImageFolderDataset, collate, random_crop, read_list_file


def _image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "hr"
    _image(root / "a.png", 40, 24, seed=1)
    _image(root / "sub" / "b.jpg", 12, 10, seed=2)  # smaller than the crop: padded
    (root / "a.txt").write_text("cat, sofa,\n")
    return root


def test_random_crop_sizes_and_reflect_padding():
    image = np.arange(5 * 3 * 3).reshape(5, 3, 3)
    crop = random_crop(image, 4, random.Random(0))
    assert crop.shape == (4, 4, 3)
    big = random_crop(image, 8, random.Random(0))
    assert big.shape == (8, 8, 3)
    np.testing.assert_array_equal(big[:5, :3], image)  # padded bottom/right only, original in place
    np.testing.assert_array_equal(big[:5, 3], image[:, 1])  # reflection without repeating the edge
    assert random_crop(np.zeros((1, 1, 3)), 4, random.Random(0)).shape == (4, 4, 3)


def test_items_sizes_tags_and_determinism(folder: Path):
    dataset = ImageFolderDataset(folder, resolution=16, seed=3)
    assert len(dataset) == 2
    items = [dataset[i] for i in range(2)]
    for item in items:
        assert item["gt"].shape == (3, 16, 16) and item["gt"].dtype == torch.float32
        assert 0 <= item["gt"].min() and item["gt"].max() <= 1
    assert items[0]["tags"] == "cat, sofa," and items[1]["tags"] is None
    assert items[0]["path"].endswith("a.png")
    again = ImageFolderDataset(folder, resolution=16, seed=3)
    assert torch.equal(again[0]["gt"], items[0]["gt"])
    crops = {ImageFolderDataset(folder, resolution=16, seed=s)[0]["gt"].sum().item() for s in range(6)}
    assert len(crops) > 1  # the seed moves the crop
    per_epoch = []
    for epoch in range(5):
        dataset.set_epoch(epoch)
        per_epoch.append(dataset[0]["gt"])
    assert torch.equal(per_epoch[0], items[0]["gt"])
    assert any(not torch.equal(crop, per_epoch[0]) for crop in per_epoch[1:])  # a new epoch, new crops


def test_flip_mirrors_the_crop(folder: Path):
    # A crop the size of the image leaves only the flip random: the two versions are mirror images.
    _image(folder / "c.png", 16, 16, seed=4)
    (folder / "a.png").unlink()
    (folder / "sub" / "b.jpg").unlink()
    seen = {ImageFolderDataset(folder, 16, seed=s)[0]["gt"].numpy().tobytes() for s in range(12)}
    plain = ImageFolderDataset(folder, 16, flip=False)[0]["gt"]
    assert seen == {plain.numpy().tobytes(), plain.flip(-1).numpy().tobytes()}


def test_tags_dir_by_stem_and_relative_path(folder: Path, tmp_path: Path):
    tags = tmp_path / "tags"
    (tags / "sub").mkdir(parents=True)
    (tags / "sub" / "b.txt").write_text("tree\n")
    (tags / "a.txt").write_text("dog\n")  # tags_dir wins over the file beside the image
    dataset = ImageFolderDataset(folder, resolution=8, tags_dir=tags)
    assert [dataset[i]["tags"] for i in range(2)] == ["dog", "tree"]


def test_unreadable_file_is_skipped_with_one_log(folder: Path, caplog: pytest.LogCaptureFixture):
    broken = folder / "0_broken.png"
    broken.write_bytes(b"not a png")
    dataset = ImageFolderDataset(folder, resolution=8)
    assert len(dataset) == 3
    with caplog.at_level(logging.WARNING, logger="seesr.data.image_folder"):
        first, again = dataset[0], dataset[0]
    assert first["path"].endswith("a.png") and again["path"].endswith("a.png")
    messages = [r.getMessage() for r in caplog.records if "0_broken.png" in r.getMessage()]
    assert len(messages) == 1


def test_no_readable_images_raises(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(RuntimeError, match="none of the 1 image files"):
        dataset[0]
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderDataset(tmp_path, resolution=0)


def test_list_file_and_dataloader_collate(folder: Path, tmp_path: Path):
    listing = tmp_path / "train.txt"
    listing.write_text(f"# training images\nhr/sub/b.jpg\n\n{folder / 'a.png'}\nhr/missing.png\n")
    assert read_list_file(listing)[0] == tmp_path / "hr" / "sub" / "b.jpg"
    dataset = ImageFolderDataset(listing, resolution=8)
    assert [Path(p).name for p in map(str, dataset.files)] == ["b.jpg", "a.png"]
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate)))
    assert batch["gt"].shape == (2, 3, 8, 8)
    assert batch["tags"] == [None, "cat, sofa,"]
    assert len(batch["path"]) == 2
