"""The synthetic captioned detail images: only the text can tell the classes apart at x8 / x16."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seesr.data.tgsr_synthetic import (
    BENCHMARK_CLASSES,
    DETAIL_PHRASINGS,
    detail_image,
    prepare_detail_set,
    smooth_background,
    to_uint8,
)
from seesr.metrics import psnr


@pytest.mark.parametrize("factor", [8, 16])
def test_classes_share_their_lr_but_not_their_hr(factor):
    background = smooth_background(64, np.random.default_rng(0))
    hrs = [to_uint8(detail_image(background, c.kind, c.period)) for c in BENCHMARK_CLASSES]
    lrs = [np.asarray(Image.fromarray(h).resize((64 // factor,) * 2, Image.BICUBIC)) for h in hrs]
    for i in range(len(hrs)):
        for j in range(i + 1, len(hrs)):
            assert psnr(lrs[i], lrs[j], 0) > 45
            assert psnr(hrs[i], hrs[j], 0) < 25


def test_benchmark_held_out_phrasings_use_other_words():
    stop = {"a", "of", "at", "and", "the", "in", "from", "to", "with", "all"}
    for cls in BENCHMARK_CLASSES:
        train_words = {w.strip(",") for p in cls.train for w in p.split()} - stop
        class_words = {w for w in train_words if w.startswith(cls.name[:5])}
        assert class_words, cls.name
        for phrase in cls.held_out:
            assert phrase not in cls.train and not class_words & set(phrase.replace(",", "").split()), phrase


def test_detail_set_is_seeded_and_captioned(tmp_path):
    first = prepare_detail_set(tmp_path / "a", count=12, size=32, seed=1)
    second = prepare_detail_set(tmp_path / "b", count=12, size=32, seed=1)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    captions = {p.with_suffix(".txt").read_text().strip() for p in first}
    assert captions <= {c for phrasings in DETAIL_PHRASINGS.values() for c in phrasings} and len(captions) > 3
    assert Image.open(first[0]).size == (32, 32)
