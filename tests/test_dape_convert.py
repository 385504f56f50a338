"""The released-weights converter, on checkpoints synthesized in RAM/DAPE's original key layout (tiny sizes)."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_dape import TINY_DAPE_CONFIG, tiny_dape, tiny_pixel_values

from dape import DAPEModel
from dape.backbone import relative_position_index
from dape.convert import (
    CheckpointConversionError,
    convert_dape_folder,
    convert_ram_checkpoint,
    interpolate_relative_position_bias,
    read_tag_list,
    read_thresholds,
)

RANK = 8
SCALING = 1 / RANK  # loralib: lora_alpha (1) / r

# Our key -> RAM's key (written independently of the converter's table).
_TO_ORIGINAL = [
    (r"image_encoder\.(.*)", r"visual_encoder.\1"),
    (r"image_proj\.(.*)", r"image_proj.\1"),
    (r"tagging_head\.(label_embed|wordvec_proj\..*|fc\..*)", r"\1"),
    (
        r"tagging_head\.layers\.(\d+)\.(query|key|value)\.(.*)",
        r"tagging_head.encoder.layer.\1.crossattention.self.\2.\3",
    ),
    (r"tagging_head\.layers\.(\d+)\.attn_out\.(.*)", r"tagging_head.encoder.layer.\1.crossattention.output.dense.\2"),
    (
        r"tagging_head\.layers\.(\d+)\.attn_norm\.(.*)",
        r"tagging_head.encoder.layer.\1.crossattention.output.LayerNorm.\2",
    ),
    (r"tagging_head\.layers\.(\d+)\.ffn_in\.(.*)", r"tagging_head.encoder.layer.\1.intermediate.dense.\2"),
    (r"tagging_head\.layers\.(\d+)\.ffn_out\.(.*)", r"tagging_head.encoder.layer.\1.output.dense.\2"),
    (r"tagging_head\.layers\.(\d+)\.ffn_norm\.(.*)", r"tagging_head.encoder.layer.\1.output.LayerNorm.\2"),
]
_SPLIT_QKV = re.compile(r"(image_encoder\.layers\.\d+\.blocks\.\d+\.attn)\.(query|key|value)\.(weight|bias)")


def original_layout(model: DAPEModel) -> dict[str, torch.Tensor]:
    """``model``'s weights as RAM stores them, plus what RAM has and DAPE drops (buffers, tag encoder, decoder)."""
    ours = model.state_dict()
    state = {}
    for key, value in ours.items():
        match = _SPLIT_QKV.fullmatch(key)
        if match:
            prefix, name, kind = match.groups()
            if name == "query":
                qkv = torch.cat([ours[f"{prefix}.{n}.{kind}"] for n in ("query", "key", "value")])
                state[prefix.replace("image_encoder", "visual_encoder") + f".qkv.{kind}"] = qkv.clone()
            continue
        for pattern, replacement in _TO_ORIGINAL:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, replacement, key)] = value.clone()
                break
        else:
            raise AssertionError(f"no original name for {key}")
    for stage, layer in enumerate(model.image_encoder.layers):
        for index, block in enumerate(layer.blocks):
            prefix = f"visual_encoder.layers.{stage}.blocks.{index}"
            state[f"{prefix}.attn.relative_position_index"] = relative_position_index(block.window)
            if block.attn_mask is not None:
                state[f"{prefix}.attn_mask"] = block.attn_mask.clone()
    hidden = model.config.tagging_hidden_size
    for layer in range(3):  # RAM's tag encoder: its first layers are tied to the tagging head
        for part in ("attention.self.query", "crossattention.self.query", "crossattention.output.dense"):
            source = f"tagging_head.encoder.layer.{layer}.{part}.weight"
            value = state[source] if source in state else torch.randn(hidden, hidden, dtype=torch.float64)
            state[f"tag_encoder.encoder.layer.{layer}.{part}.weight"] = value.clone()
    state["tag_encoder.embeddings.word_embeddings.weight"] = torch.randn(30, hidden)
    state["text_decoder.bert.encoder.layer.0.attention.self.query.weight"] = torch.randn(hidden, hidden)
    state["text_decoder.cls.predictions.bias"] = torch.randn(30)
    return state


def dape_lora(model: DAPEModel, seed: int = 0, tied_b: float = 0.0) -> dict[str, torch.Tensor]:
    """A DAPE.pth in loralib's layout: fused-qkv MergedLinear adapters (q, v) and tagging-head query/key adapters.

    The tag encoder's adapters are included too, with ``lora_B`` scaled by ``tied_b`` (0 in a real DAPE.pth).
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.3

    state = {}
    for stage, layer in enumerate(model.image_encoder.layers):
        width = layer.blocks[0].attn.query.in_features
        for index in range(len(layer.blocks)):
            prefix = f"visual_encoder.layers.{stage}.blocks.{index}.attn.qkv"
            state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"] = rand(2 * RANK, width), rand(2 * width, RANK)
    hidden, width = model.config.tagging_hidden_size, model.config.projection_dim
    for owner, layers, b_scale in (("tagging_head", 2, 1.0), ("tag_encoder", 3, tied_b)):
        for layer in range(layers):
            prefix = f"{owner}.encoder.layer.{layer}.crossattention.self"
            state[f"{prefix}.query.lora_A"], state[f"{prefix}.query.lora_B"] = (
                rand(RANK, hidden),
                rand(hidden, RANK) * b_scale,
            )
            state[f"{prefix}.key.lora_A"], state[f"{prefix}.key.lora_B"] = (
                rand(RANK, width),
                rand(hidden, RANK) * b_scale,
            )
    state["text_decoder.bert.encoder.layer.0.attention.self.query.lora_A"] = rand(RANK, hidden)
    state["text_decoder.bert.encoder.layer.0.attention.self.query.lora_B"] = torch.zeros(hidden, RANK)
    return state


def merge_by_hand(ram: dict[str, torch.Tensor], dape: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """loralib's eval-time merge, in RAM's layout: ``W += zero_pad(conv1d(A, B, groups=2)) * scaling`` on qkv,
    ``W += B @ A * scaling`` on query/key, applied through the tie for the tag encoder's first two layers."""
    merged = {key: value.clone() for key, value in ram.items()}
    for key, lora_a in dape.items():
        if not key.endswith("lora_A"):
            continue
        module, lora_b = key[: -len(".lora_A")], dape[key[:-1] + "B"]
        if module.endswith(".qkv"):
            delta = F.conv1d(lora_a.unsqueeze(0), lora_b.unsqueeze(-1), groups=2).squeeze(0)
            width = lora_b.shape[0] // 2
            padded = torch.zeros(3 * width, lora_a.shape[1], dtype=delta.dtype)
            padded[:width], padded[2 * width :] = delta[:width], delta[width:]
            merged[module + ".weight"] += padded * SCALING
        elif module.startswith("tagging_head"):
            merged[module + ".weight"] += lora_b @ lora_a * SCALING
        elif module.startswith("tag_encoder") and int(module.split(".")[3]) < 2:
            tied = module.replace("tag_encoder", "tagging_head")
            merged[tied + ".weight"] += lora_b @ lora_a * SCALING
    return merged


def model_from_original(state: dict[str, torch.Tensor], num_classes: int = 12) -> DAPEModel:
    """A tiny DAPEModel loaded from RAM-layout weights by hand (the converter's job, done independently)."""
    model = tiny_dape(num_classes=num_classes).double()
    ours = {}
    for key in model.state_dict():
        match = _SPLIT_QKV.fullmatch(key)
        if match:
            prefix, name, kind = match.groups()
            fused = state[prefix.replace("image_encoder", "visual_encoder") + f".qkv.{kind}"]
            ours[key] = fused.chunk(3)[("query", "key", "value").index(name)]
            continue
        for pattern, replacement in _TO_ORIGINAL:
            if re.fullmatch(pattern, key):
                ours[key] = state[re.sub(pattern, replacement, key)]
                break
    model.load_state_dict(ours, strict=True)
    return model


@pytest.fixture
def released(tmp_path):
    """Write tiny released files; returns a function(ram_state, dape_state | None) -> convert() arguments."""
    source = tiny_dape().double()
    tags_path, thresholds_path = tmp_path / "ram_tag_list.txt", tmp_path / "ram_tag_list_threshold.txt"
    tags_path.write_text("\n".join(source.config.tag_names), encoding="utf-8")  # no final newline, like RAM's
    thresholds_path.write_text("".join(f"{t}\n" for t in source.config.tag_thresholds), encoding="utf-8")

    def write(ram_state, dape_state=None):
        torch.save({"model": ram_state, "epoch": 3}, tmp_path / "ram.pth")
        dape_path = None
        if dape_state is not None:
            dape_path = tmp_path / "DAPE.pth"
            torch.save(dape_state, dape_path)
        return tmp_path / "ram.pth", dape_path, tags_path, thresholds_path

    write.source = source
    return write


def _convert(paths, **kwargs):
    return convert_ram_checkpoint(*paths, architecture=TINY_DAPE_CONFIG, **kwargs)


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def _assert_same(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual.image_embeds, expected.image_embeds, rtol=tol, atol=tol)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=tol, atol=tol)


# Conversion -----------------------------------------------------------------------------------------------------


def test_plain_ram_converts_exactly(released):
    paths = released(original_layout(released.source))
    model = _convert(paths)
    assert model.dtype == torch.float64 and not model.training and not model.has_lora
    for key, value in released.source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert model.config.tag_names == released.source.config.tag_names
    assert model.config.tag_thresholds == released.source.config.tag_thresholds


def test_dape_lora_matches_the_original_lora_math_by_hand(released):
    ram, dape = original_layout(released.source), dape_lora(released.source)
    model = _convert(released(ram, dape))
    reference = model_from_original(merge_by_hand(ram, dape))
    x = tiny_pixel_values(3).double()
    expected, actual = _outputs(reference, x), _outputs(model, x)
    _assert_same(actual, expected)
    assert model.tags(logits=actual.logits) == reference.tags(logits=expected.logits)
    # the adapters do change the model
    assert not torch.allclose(_outputs(released.source, x).logits, actual.logits)


def test_unmerged_conversion_equals_merged(released):
    paths = released(original_layout(released.source), dape_lora(released.source))
    merged, unmerged = _convert(paths), _convert(paths, merge_lora=False)
    assert unmerged.has_lora and not merged.has_lora
    assert unmerged.image_encoder.layers[0].blocks[1].attn.value.scaling["default"] == SCALING
    x = tiny_pixel_values().double()
    _assert_same(_outputs(unmerged, x), _outputs(merged, x))
    unmerged.merge_lora()
    _assert_same(_outputs(unmerged, x), _outputs(merged, x))


def test_tied_tag_encoder_adapters_are_folded_like_the_original_eval_merge(released):
    ram, dape = original_layout(released.source), dape_lora(released.source, tied_b=1.0)
    x = tiny_pixel_values().double()
    expected = _outputs(model_from_original(merge_by_hand(ram, dape)), x)
    paths = released(ram, dape)
    _assert_same(_outputs(_convert(paths), x), expected)
    _assert_same(_outputs(_convert(paths, merge_lora=False), x), expected)


def test_vision_multi_rename_and_tied_fallback(released):
    ram = original_layout(released.source)
    ram = {key.replace("tagging_head", "vision_multi"): value for key, value in ram.items()}
    del ram["vision_multi.encoder.layer.1.crossattention.self.query.weight"]  # present as the tied tag_encoder copy
    x = tiny_pixel_values().double()
    _assert_same(_outputs(_convert(released(ram)), x), _outputs(released.source, x), tol=0)


def test_float32_checkpoint_and_dtype_override(released):
    ram = {k: (v.float() if v.is_floating_point() else v) for k, v in original_layout(released.source).items()}
    paths = released(ram)
    assert _convert(paths).dtype == torch.float32
    assert _convert(paths, dtype=torch.float64).dtype == torch.float64


def test_relative_position_tables_are_resized_to_the_window(released):
    ram = original_layout(released.source)
    generator = torch.Generator().manual_seed(0)
    key = "visual_encoder.layers.1.blocks.0.attn.relative_position_bias_table"
    ram[key] = torch.randn(5 * 5, 2, generator=generator, dtype=torch.float64)  # a window-3 table for window 2
    model = _convert(released(ram))
    converted = model.state_dict()["image_encoder.layers.1.blocks.0.attn.relative_position_bias_table"]
    torch.testing.assert_close(converted, interpolate_relative_position_bias(ram[key], 9), rtol=0, atol=0)
    assert converted.shape == (9, 2) and converted.dtype == torch.float64


def test_convert_folder_saves_a_loadable_float32_model(released, tmp_path):
    paths = released(original_layout(released.source), dape_lora(released.source))
    out = convert_dape_folder(*paths, tmp_path / "dape", architecture=TINY_DAPE_CONFIG)
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DAPEModel.from_pretrained(out)
    assert loaded.dtype == torch.float32 and len(loaded.config.tag_names) == 12
    x = tiny_pixel_values().double()
    expected = _outputs(_convert(paths), x)
    actual = _outputs(loaded, x.float())
    torch.testing.assert_close(actual.logits.double(), expected.logits, rtol=1e-4, atol=1e-4)


# Strict accounting ----------------------------------------------------------------------------------------------


def _drop(key):
    def mutate(ram, dape):
        del ram[key]

    return mutate


def _add(key, value):
    def mutate(ram, dape):
        ram[key] = value

    return mutate


def _drop_lora_b(ram, dape):
    del dape["visual_encoder.layers.0.blocks.1.attn.qkv.lora_B"]


def _bad_lora_shape(ram, dape):
    dape["tagging_head.encoder.layer.0.crossattention.self.key.lora_A"] = torch.zeros(RANK, 7)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            _drop("visual_encoder.layers.1.blocks.1.mlp.fc2.bias"),
            "missing weights.*image_encoder.layers.1.blocks.1.mlp.fc2.bias",
        ),
        (_drop("fc.weight"), "missing weights.*tagging_head.fc.weight"),
        (_add("visual_encoder.head.weight", torch.zeros(3, 16)), "unexpected keys.*visual_encoder.head.weight"),
        (_add("visual_encoder.absolute_pos_embed", torch.zeros(1, 64, 8)), "unexpected keys.*absolute_pos_embed"),
        (_add("visual_encoder.layers.2.blocks.0.norm1.weight", torch.ones(32)), "does not have.*layers.2.blocks.0"),
        (_add("image_proj.weight", torch.zeros(16, 31)), "shape mismatches.*image_proj.weight"),
        (_drop_lora_b, "qkv.lora_A has no matching lora_B"),
        (_bad_lora_shape, "LoRA for tagging_head.layers.0.key"),
    ],
    ids=["missing-swin", "missing-fc", "head", "ape", "extra-stage", "shape", "lora-pair", "lora-shape"],
)
def test_every_key_is_accounted_for(released, mutate, message):
    ram, dape = original_layout(released.source), dape_lora(released.source)
    mutate(ram, dape)
    with pytest.raises(CheckpointConversionError, match=f"(?s){message}"):
        _convert(released(ram, dape))


def test_architecture_mismatch_is_reported(released):
    paths = released(original_layout(released.source))
    with pytest.raises(CheckpointConversionError, match="(?s)missing weights.*check the `architecture` config"):
        convert_ram_checkpoint(*paths, architecture={**TINY_DAPE_CONFIG, "depths": (2, 4)})


def test_another_swin_width_names_the_expected_architecture(released):
    paths = released(original_layout(released.source))
    with pytest.raises(CheckpointConversionError, match="embed_dim 8, expected embed_dim 16"):
        convert_ram_checkpoint(*paths, architecture={**TINY_DAPE_CONFIG, "embed_dim": 16})


def test_tag_and_threshold_files_must_agree(released):
    ram_path, dape_path, tags_path, thresholds_path = released(original_layout(released.source))
    thresholds_path.write_text("0.5\n0.6\n")
    with pytest.raises(CheckpointConversionError, match="2 thresholds but .* 12 tags"):
        _convert((ram_path, dape_path, tags_path, thresholds_path))
    tags_path.write_text("a\nb")
    with pytest.raises(CheckpointConversionError, match="12 classes but .* 2 tags"):
        _convert((ram_path, dape_path, tags_path, thresholds_path))


def test_checkpoint_file_errors(released, tmp_path):
    ram_path, _, tags_path, thresholds_path = released(original_layout(released.source))
    torch.save(original_layout(released.source), ram_path)  # no {'model': ...} wrapper
    with pytest.raises(CheckpointConversionError, match="no 'model' entry"):
        _convert((ram_path, None, tags_path, thresholds_path))
    torch.save({"model": {}, "config": np.dtype("float32")}, ram_path)  # not loadable with weights_only=True
    with pytest.raises(CheckpointConversionError, match="weights_only=True"):
        _convert((ram_path, None, tags_path, thresholds_path))
    with pytest.raises(FileNotFoundError):
        _convert((tmp_path / "absent.pth", None, tags_path, thresholds_path))


def test_tag_list_and_threshold_files(tmp_path):
    (tmp_path / "tags.txt").write_text("a b\nc\n\nd", encoding="utf-8")
    assert read_tag_list(tmp_path / "tags.txt") == ["a b", "c", "", "d"]
    (tmp_path / "thr.txt").write_text(" 0.65\n0.8 \nx\n", encoding="utf-8")
    with pytest.raises(CheckpointConversionError, match="thr.txt:3"):
        read_thresholds(tmp_path / "thr.txt")


# Relative position bias interpolation ---------------------------------------------------------------------------


def test_interpolation_keeps_matching_tables():
    table = torch.randn(9, 2, dtype=torch.float64)
    assert interpolate_relative_position_bias(table, 9) is table


@pytest.mark.parametrize(("src", "dst"), [(13, 23), (23, 13), (7, 11), (5, 9)])
def test_interpolation_matches_fitpack_bicubic(src, dst):
    interpolate = pytest.importorskip("scipy.interpolate")
    table = torch.randn(src * src, 3, generator=torch.Generator().manual_seed(src))
    # RAM's grid: a geometric progression whose ratio is found by bisection, target offsets -dst//2 .. dst//2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        left, right = (left, q) if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2 else (q, right)
    distances = np.cumsum([1.0] + [q ** (i + 1) for i in range(src // 2 - 1)])
    x = np.concatenate([-distances[::-1], [0.0], distances])
    targets = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    expected = torch.cat(
        [
            torch.tensor(
                interpolate.RectBivariateSpline(x, x, table[:, h].view(src, src).double().numpy(), kx=3, ky=3, s=0)(
                    targets, targets
                ),
                dtype=torch.float32,
            ).view(-1, 1)
            for h in range(3)
        ],
        dim=1,
    )
    actual = interpolate_relative_position_bias(table, dst * dst)
    assert actual.shape == (dst * dst, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_interpolation_needs_four_points():
    with pytest.raises(CheckpointConversionError, match="< 4"):
        interpolate_relative_position_bias(torch.zeros(9, 1), 25)


def test_plain_ram_condition_projections_are_dropped(released):
    """SeeSR's plain-RAM Swin has zero-initialised condition_attention / condition_ffn Linears in every block."""
    state = original_layout(released.source)
    blocks = {k.rsplit(".attn.", 1)[0] for k in state if ".blocks." in k and ".attn." in k}
    for block in blocks:
        dim = state[f"{block}.norm1.weight"].shape[0]
        state[f"{block}.condition_attention.0.weight"] = torch.zeros(2 * dim, 256, dtype=torch.float64)
        state[f"{block}.condition_ffn.0.weight"] = torch.zeros(2 * dim, 256, dtype=torch.float64)
    model = _convert(released(state))
    for key, value in released.source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
