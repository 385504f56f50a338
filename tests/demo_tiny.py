"""Tiny pipeline folders for the `seesr demo` tests: TGSR (x2/x4/x8) and SeeSR with a tiny DAPE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def save_tiny_tgsr(folder: Path) -> Path:
    from tgsr_tiny import tiny_bert_tokenizer, tiny_model, tiny_text_encoder

    from pipelines import TGSRPipeline

    pipe = TGSRPipeline(tiny_model(), tiny_text_encoder(), tiny_bert_tokenizer(folder.parent / f"{folder.name}-tok"))
    pipe.save_pretrained(folder)
    return folder


def save_tiny_seesr(folder: Path, presets: dict | None = None) -> Path:
    """A tiny SeeSR pipeline with a tiny DAPE; `presets` go to the folder's presets.json."""
    from tiny import tiny_pipeline
    from tiny_dape import tiny_dape

    tiny_pipeline(seed=0, prompt_extractor=tiny_dape()).save_pretrained(folder)
    if presets is not None:
        (folder / "presets.json").write_text(json.dumps(presets), encoding="utf-8")
    return folder


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 4, 1), max(width // 4, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)
