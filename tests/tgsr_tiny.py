"""Seeded tiny builders for the TGSR tests: a 32-wide BERT text encoder with a real (tiny) WordPiece tokenizer,
a tiny TGSRModel, a tiny random CLIP with a tiny BPE tokenizer, and small captioned image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = [
    "a",
    "an",
    "red",
    "blue",
    "bird",
    "on",
    "the",
    "branch",
    "cat",
    "with",
    "green",
    "eyes",
    "photo",
    "of",
    "tree",
]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ","]


def tiny_bert_tokenizer(folder: Path):
    """A BertTokenizer over `BERT_VOCAB` (written to `folder/vocab.txt`)."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(str(folder / "vocab.txt"))


def tiny_text_encoder(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(BERT_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval().requires_grad_(False)


def save_tiny_text_encoder(folder: Path, seed: int = 0) -> Path:
    """A transformers folder (model + tokenizer) usable as `text_encoder: <folder>`."""
    tokenizer = tiny_bert_tokenizer(folder / "_vocab")
    tiny_text_encoder(seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_MODEL = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "upsample_channels": 8,
    "upscale_factors": (2, 4, 8),
    "detail_channels": 8,
    "detail_blocks": 1,
    "text_fusion": "both",
    "attention_heads": 2,
    "sentence_channels": 4,
}


def tiny_model(seed: int = 0, perturb: bool = True, text_dim: int = 32, **overrides):
    """A tiny TGSRModel; `perturb` adds noise to every weight so the zero-initialised heads are not identities."""
    from seesr.models.tgsr import TGSRModel

    torch.manual_seed(seed)
    model = TGSRModel(text_dim=text_dim, **{**TINY_MODEL, **overrides})
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random 32-wide CLIPModel (32 px images) + a tiny BPE CLIPTokenizer, saved to `folder`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(f"{char}</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = [*word[:-1], f"{word[-1]}</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def captioned_folder(folder: Path, count: int = 3, size: int = 48, seed: int = 0) -> Path:
    """`count` smooth random RGB images `size` x `size` with captions (name.png + name.txt)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    captions = ["a red bird on a branch", "a cat with green eyes", "a photo of a tree"]
    for i in range(count):
        small = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(captions[i % len(captions)] + "\n", encoding="utf-8")
    return folder
