"""Drift guards for code adapted from diffusers: a diffusers upgrade that changes an original fails here.

Every method marked ``# Adapted from diffusers==X Class.method`` in the source tree is pinned below by the hash of
the installed original's source, and the RCA blocks (which re-implement the stock forwards) are checked to compute
exactly what the stock blocks compute when no image tokens are given. When a pin fails: read the new original,
port its change into the adapted copy (seesr/models/rca.py), then update the pin.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets import unet_2d_blocks
from tiny import randomize, tiny_unet_config, unet_inputs

from seesr.models.rca import add_rca

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = "diffusers.models.unets.unet_2d_blocks"

#: "module.Class.method" of the diffusers original -> sha256 of its source in the diffusers version it was adapted from
PINNED = {
    f"{BLOCKS}.CrossAttnDownBlock2D.forward": "09b5b4d5653debc380cec08cfbcb8e0eb22294ae55ede295bb417953a03b5540",
    f"{BLOCKS}.UNetMidBlock2DCrossAttn.forward": "5943b53e3ade0a138fe5fd48e6c2c92e83f9cb6b1208f726215125c553373b3e",
    f"{BLOCKS}.CrossAttnUpBlock2D.forward": "870431c339938ca8d4afcc8a76ffe04913f40f079958bad3511a5b5560588d90",
}
ADAPTED_MARK = re.compile(r"#\s*Adapted from diffusers==[\w.]+ (\w+)\.(\w+)")


def resolve(dotted: str):
    module, cls, method = dotted.rsplit(".", 2)
    return getattr(getattr(importlib.import_module(module), cls), method)


def source_hash(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def drifted() -> list[str]:
    """The pinned originals whose installed source no longer matches the pin."""
    return [name for name, pin in PINNED.items() if source_hash(resolve(name)) != pin]


def test_every_adapted_method_is_pinned():
    marked = set()
    for folder in ("seesr", "dape", "pipelines"):
        for path in (ROOT / folder).rglob("*.py"):
            marked.update(ADAPTED_MARK.findall(path.read_text(encoding="utf-8")))
    assert marked, "no 'Adapted from diffusers==' marks found: the scan is broken"
    pinned = {tuple(name.rsplit(".", 2)[1:]) for name in PINNED}
    assert marked <= pinned, f"adapted but not pinned: {sorted(marked - pinned)}"


def test_pinned_diffusers_originals_are_unchanged():
    assert drifted() == [], "diffusers changed these originals; port the change into the adapted copies and re-pin"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_pin_fails_when_the_stock_method_changes(monkeypatch, name):
    module, cls, method = name.rsplit(".", 2)
    original = resolve(name)

    def changed(self, *args, **kwargs):  # a "new diffusers version" of the method
        return original(self, *args, **kwargs)

    monkeypatch.setattr(getattr(importlib.import_module(module), cls), method, changed)
    assert drifted() == [name]


@pytest.fixture(scope="module")
def stock_and_rca():
    config = {k: v for k, v in tiny_unet_config().items() if "image_" not in k}
    stock = randomize(UNet2DConditionModel.from_config(config), seed=3).eval()
    rca = copy.deepcopy(stock)
    assert len(add_rca(rca, 32)) == 3  # down_blocks.0, mid_block, up_blocks.1: every CrossAttn block
    return stock, rca


def unet_output(model):
    inputs = unet_inputs(batch=2, size=16, seed=5)
    inputs.pop("image_encoder_hidden_states")
    with torch.no_grad():
        return model(**inputs).sample


def test_rca_blocks_without_tokens_equal_the_stock_blocks(stock_and_rca):
    stock, rca = stock_and_rca
    assert {type(b).__name__ for b in rca.down_blocks} >= {"RCACrossAttnDownBlock2D"}
    assert torch.equal(unet_output(rca), unet_output(stock))


@pytest.mark.parametrize("cls", ["CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D"])
def test_the_equivalence_fails_when_a_stock_forward_changes(monkeypatch, stock_and_rca, cls):
    stock, rca = stock_and_rca
    stock_class = getattr(unet_2d_blocks, cls)
    original = stock_class.forward

    def changed(self, *args, **kwargs):  # a stock forward that now computes something slightly different
        output = original(self, *args, **kwargs)
        if isinstance(output, tuple):
            return (output[0] * 1.001, *output[1:])
        return output * 1.001

    monkeypatch.setattr(stock_class, "forward", changed)
    assert not torch.equal(unet_output(rca), unet_output(stock))


@pytest.mark.parametrize("name", ["SeeSRUNet2DConditionModel", "SeeSRControlNetModel"])
def test_seesr_models_declare_the_stock_arguments_plus_rca(name):
    """The SeeSR models pass every stock argument on by name (``seesr.models.unet.stock_arguments``), so each must
    declare exactly the stock class's arguments with its defaults, plus the two RCA ones: an argument a diffusers
    upgrade adds or renames fails here instead of being dropped or missing from the saved config."""
    import seesr

    model = getattr(seesr, name)
    stock = next(c for c in model.__mro__[1:] if c.__module__.startswith("diffusers."))
    ours = {k: p.default for k, p in inspect.signature(model.__init__).parameters.items()}
    theirs = {k: p.default for k, p in inspect.signature(stock.__init__).parameters.items()}
    assert ours == {**theirs, "use_image_cross_attention": True, "image_cross_attention_dim": 512}
