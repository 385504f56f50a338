"""Convert the released RAM + DAPE files into a `DAPEModel` (safetensors folder via ``save_pretrained``).

Inputs, as SeeSR loads them (``ram(pretrained=ram_swin_large_14m.pth, pretrained_condition=DAPE.pth)``):

- ``ram_swin_large_14m.pth``: ``torch.load(...)['model']``, the state dict of RAM. Like RAM's
  ``load_checkpoint_swinlarge``: ``relative_position_bias_table`` tensors are resized to this model's window
  (bicubic spline over RAM's geometric grid, computed in float64 from float32 and rounded to float32 like
  ``scipy.interpolate.interp2d(kind='cubic')``), ``relative_position_index``/``attn_mask`` are dropped (recomputed
  here), and ``vision_multi`` is renamed ``tagging_head``.
- ``DAPE.pth`` (optional): a flat dict of ``loralib`` tensors (``*.lora_A``/``*.lora_B``) laid over the RAM dict.
  Swin's fused ``attn.qkv`` carries a ``MergedLinear`` adapter on q and v: ``lora_A`` is (2r, C) with rows
  ``[:r]`` for q and ``[r:]`` for v, ``lora_B`` is (2C, r) with rows ``[:C]`` for q and ``[C:]`` for v. The tagging
  head's cross-attention ``query``/``key`` carry plain adapters. The scaling is ``lora_alpha / r = 1 / r``.
- ``ram_tag_list.txt`` (``read().splitlines()``) and ``ram_tag_list_threshold.txt`` (one float per line).

Every key is accounted for: mapped onto a `DAPEModel` weight, merged as LoRA, or dropped by a rule below; anything
else, any missing weight and any shape mismatch raises `CheckpointConversionError` listing the keys.

Dropped: the tag encoder and text decoder (``tag_encoder.*``, ``text_decoder.*``: captioning, unused for tags),
the tagging head's deleted embeddings and self-attention, and the recomputed buffers above.

One quirk is reproduced on purpose: RAM ties the tagging head's weights to the first layers of ``tag_encoder``, so
that when the original model switches to ``eval()`` loralib merges *both* modules' adapters into the shared
weight. The ``tag_encoder.encoder.layer.{i}.crossattention.self.{query,key}`` adapters of the tied layers are
therefore folded into the base weights too (they are zero in a real DAPE.pth, which never trains them). If the
tagging head's own weight is absent, the tied ``tag_encoder`` copy is used, as loading it into RAM would.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lora import LORA_ALPHA
from .model import DAPEModel

logger = logging.getLogger(__name__)

#: Keys the converter drops on purpose, with the reason shown in the log.
DROPPED_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"tag_encoder\..*", "tag encoder (captioning; not used for tagging)"),
    (r"text_decoder\..*", "text decoder (captioning; not used for tagging)"),
    (r"tagging_head\.embeddings\..*", "tagging head embeddings (deleted in RAM)"),
    (r"tagging_head\.encoder\.layer\.\d+\.attention\..*", "tagging head self-attention (deleted in RAM)"),
    (
        r"visual_encoder\.layers\.\d+\.blocks\.\d+\.condition_(attention|ffn)\..*",
        "condition projections of SeeSR's plain-RAM Swin (zero-initialised; inactive without a condition)",
    ),
    (r".*\.relative_position_index", "recomputed buffer"),
    (r".*\.attn_mask", "recomputed buffer"),
)

_SWIN = r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\."
_HEAD = r"tagging_head\.encoder\.layer\.(\d+)\."
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"visual_encoder\.patch_embed\.(proj|norm)\.(weight|bias)", r"image_encoder.patch_embed.\1.\2"),
    (
        r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
        r"image_encoder.layers.\1.blocks.\2.\3.\4",
    ),
    (
        r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
        r"image_encoder.layers.\1.blocks.\2.attn.relative_position_bias_table",
    ),
    (
        r"visual_encoder\.layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)",
        r"image_encoder.layers.\1.downsample.\2.\3",
    ),
    (r"visual_encoder\.norm\.(weight|bias)", r"image_encoder.norm.\1"),
    (r"image_proj\.(weight|bias)", r"image_proj.\1"),
    (r"label_embed", r"tagging_head.label_embed"),
    (r"wordvec_proj\.(weight|bias)", r"tagging_head.wordvec_proj.\1"),
    (r"fc\.(weight|bias)", r"tagging_head.fc.\1"),
    (_HEAD + r"crossattention\.self\.(query|key|value)\.(weight|bias)", r"tagging_head.layers.\1.\2.\3"),
    (_HEAD + r"crossattention\.output\.dense\.(weight|bias)", r"tagging_head.layers.\1.attn_out.\2"),
    (_HEAD + r"crossattention\.output\.LayerNorm\.(weight|bias)", r"tagging_head.layers.\1.attn_norm.\2"),
    (_HEAD + r"intermediate\.dense\.(weight|bias)", r"tagging_head.layers.\1.ffn_in.\2"),
    (_HEAD + r"output\.dense\.(weight|bias)", r"tagging_head.layers.\1.ffn_out.\2"),
    (_HEAD + r"output\.LayerNorm\.(weight|bias)", r"tagging_head.layers.\1.ffn_norm.\2"),
)
_QKV = re.compile(_SWIN + r"(weight|bias)")
_SWIN_LORA = re.compile(_SWIN + r"lora_(A|B)")
_HEAD_LORA = re.compile(
    r"(tagging_head|tag_encoder)\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)\.lora_(A|B)"
)
_TIED = re.compile(r"tag_encoder(\.encoder\.layer\.(\d+)\.(crossattention|intermediate|output)\..*)")


class CheckpointConversionError(ValueError):
    """The released files do not match the expected layout (the message lists the offending keys)."""


# Files ---------------------------------------------------------------------------------------------------------


def read_tag_list(path: str | Path) -> list[str]:
    """RAM's tag list: one name per line (``read().splitlines()``, as RAM reads it)."""
    names = Path(path).read_text(encoding="utf-8").splitlines()
    if not names:
        raise CheckpointConversionError(f"tag list {path} is empty")
    return names


def read_thresholds(path: str | Path) -> list[float]:
    """RAM's per-class thresholds: one float per line."""
    values = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            values.append(float(line.strip()))
        except ValueError:
            raise CheckpointConversionError(f"{path}:{number}: expected a number, got {line!r}") from None
    return values


def _torch_load(path: str | Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # the unpickler raises several types
        raise CheckpointConversionError(
            f"cannot read {what} {path} with torch.load(weights_only=True): {error}"
        ) from error


def _check_tensors(state_dict: Any, path: str | Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointConversionError(f"{what} {path} is not a flat dict of tensors")
    return dict(state_dict)


def load_ram_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(path)['model']`` (weights only)."""
    checkpoint = _torch_load(path, "RAM checkpoint")
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise CheckpointConversionError(
            f"RAM checkpoint {path} has no 'model' entry (expected torch.save({{'model': ...}}))"
        )
    return _check_tensors(checkpoint["model"], path, "the 'model' entry of")


def load_dape_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """DAPE.pth: a flat dict of LoRA tensors."""
    return _check_tensors(_torch_load(path, "DAPE checkpoint"), path, "DAPE checkpoint")


# Relative position bias ----------------------------------------------------------------------------------------


def _spline_operator(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Matrix S with S @ y = the not-a-knot cubic spline through (x, y) evaluated at ``targets``.

    That is FITPACK's interpolating (s=0) cubic spline, which ``interp2d(kind='cubic')`` builds on a grid; like
    FITPACK's evaluator, targets outside [x[0], x[-1]] are clamped to the ends.
    """
    n = len(x)
    if n < 4:
        raise CheckpointConversionError(f"cannot spline-interpolate a relative position table of side {n} (< 4)")
    h = np.diff(x)
    system, rhs = np.zeros((n, n)), np.zeros((n, n))
    system[0, :3] = (h[1], -(h[0] + h[1]), h[0])
    system[-1, -3:] = (h[-1], -(h[-2] + h[-1]), h[-2])
    for i in range(1, n - 1):
        system[i, i - 1 : i + 2] = (h[i - 1], 2 * (h[i - 1] + h[i]), h[i])
        rhs[i, i - 1 : i + 2] = (6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i])
    second = np.linalg.solve(system, rhs)  # second derivatives at x, as a linear map of y
    t = np.clip(targets, x[0], x[-1])
    i = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    hi, left, right = h[i], x[i + 1] - t, t - x[i]
    values = np.zeros((len(t), n))
    rows = np.arange(len(t))
    values[rows, i] += left / hi
    values[rows, i + 1] += right / hi
    weight_left = (left**3 / (6 * hi) - hi * left / 6)[:, None]
    weight_right = (right**3 / (6 * hi) - hi * right / 6)[:, None]
    return values + weight_left * second[i] + weight_right * second[i + 1]


def interpolate_relative_position_bias(table: torch.Tensor, dst_num_pos: int) -> torch.Tensor:
    """Resize a ((2w-1)², heads) relative-position-bias table the way RAM's loader does.

    RAM (after BEiT) places the source entries on a geometric grid whose ratio is found by bisection, evaluates a
    bicubic spline at the integer offsets of the target window, in float64 from the float32 table, and stores float32.
    Returns the table unchanged when the size already matches; otherwise float32 cast to ``table.dtype``.
    """
    src_num_pos, num_heads = table.shape
    src_size, dst_size = int(src_num_pos**0.5), int(dst_num_pos**0.5)
    if src_size**2 != src_num_pos or dst_size**2 != dst_num_pos:
        raise CheckpointConversionError(f"relative position tables must be square: {src_num_pos} -> {dst_num_pos}")
    if src_size == dst_size:
        return table
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src_size // 2)) / (1.0 - q) > dst_size // 2:
            right = q
        else:
            left = q
    distances, current = [], 1.0
    for i in range(src_size // 2):
        distances.append(current)
        current += q ** (i + 1)
    x = np.array([-d for d in reversed(distances)] + [0.0] + distances)
    half = dst_size // 2.0
    operator = _spline_operator(x, np.arange(-half, half + 0.1, 1.0))
    grid = table.detach().float().cpu().numpy().astype(np.float64).T.reshape(num_heads, src_size, src_size)
    resized = operator @ grid @ operator.T
    result = torch.from_numpy(resized.reshape(num_heads, -1).T.astype(np.float32).copy())
    return result.to(table.dtype)


# State dict conversion -----------------------------------------------------------------------------------------


@dataclass
class _Ledger:
    """Where every source key went."""

    source: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    folded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def put(self, target: str, value: torch.Tensor, *sources: str) -> None:
        if target in self.weights:
            self.problems.append(f"{target} is given twice (from {', '.join(sources)})")
        self.weights[target] = value
        self.used.update(sources)

    def unaccounted(self) -> list[str]:
        return sorted(set(self.source) - self.used - set(self.dropped))


def _prepare_sources(ram: Mapping[str, torch.Tensor], dape: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RAM's ``vision_multi`` -> ``tagging_head`` rename, then DAPE.pth laid over it (later keys win)."""
    source: dict[str, torch.Tensor] = {}
    for key, value in ram.items():
        buffer = "relative_position" in key or "attn_mask" in key
        renamed = key if buffer else key.replace("vision_multi", "tagging_head")
        if renamed in source:
            raise CheckpointConversionError(f"the RAM checkpoint has both {key} and {renamed}")
        source[renamed] = value
    source.update(dape)
    return source


def _pair(ledger: _Ledger, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    a_key, b_key = prefix + "lora_A", prefix + "lora_B"
    if (a_key in ledger.source) != (b_key in ledger.source):
        present, absent = (a_key, "lora_B") if a_key in ledger.source else (b_key, "lora_A")
        ledger.problems.append(f"{present} has no matching {absent}")
        return None
    if a_key not in ledger.source:
        return None
    ledger.used.update((a_key, b_key))
    return ledger.source[a_key], ledger.source[b_key]


def _map_plain(ledger: _Ledger) -> None:
    patterns = [(re.compile(pattern), target) for pattern, target in _RENAMES]
    for key, value in ledger.source.items():
        for pattern, target in patterns:
            if pattern.fullmatch(key):
                ledger.put(pattern.sub(target, key), value, key)
                break
        match = _QKV.fullmatch(key)
        if match:
            stage, block, kind = match.groups()
            if value.shape[0] % 3:
                ledger.problems.append(f"{key} has shape {tuple(value.shape)}, not (3*C, ...)")
                continue
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                ledger.put(f"image_encoder.layers.{stage}.blocks.{block}.attn.{name}.{kind}", part, key)


def _map_tied_fallbacks(ledger: _Ledger, num_tagging_layers: int) -> None:
    """Use ``tag_encoder``'s copy of a tied tagging-head weight that the checkpoint lacks under its own name."""
    for key, value in ledger.source.items():
        match = _TIED.fullmatch(key)
        if not match or int(match.group(2)) >= num_tagging_layers or ".lora_" in key:
            continue
        head_key = "tagging_head" + match.group(1)
        if head_key in ledger.source:
            continue
        for pattern, target in _RENAMES:
            if re.fullmatch(pattern, head_key):
                logger.info("%s is missing; using its tied copy %s (as RAM's loader would)", head_key, key)
                ledger.put(re.sub(pattern, target, head_key), value, key)


def _map_lora(ledger: _Ledger, num_tagging_layers: int) -> None:
    swin_blocks = {m.groups()[:2] for key in ledger.source if (m := _SWIN_LORA.fullmatch(key))}
    for stage, block in sorted(swin_blocks):
        pair = _pair(ledger, f"visual_encoder.layers.{stage}.blocks.{block}.attn.qkv.")
        if pair is None:
            continue
        lora_a, lora_b = pair
        if lora_a.shape[0] % 2 or lora_b.shape[0] % 2 or lora_b.shape[1] * 2 != lora_a.shape[0]:
            ledger.problems.append(
                f"Swin qkv LoRA of layers.{stage}.blocks.{block} has shapes A {tuple(lora_a.shape)}, "
                f"B {tuple(lora_b.shape)}; expected A (2r, C), B (2C, r) for q and v"
            )
            continue
        for name, a_part, b_part in zip(("query", "value"), lora_a.chunk(2), lora_b.chunk(2)):
            ledger.lora[f"image_encoder.layers.{stage}.blocks.{block}.attn.{name}"] = (a_part, b_part)
    head = {m.groups()[:3] for key in ledger.source if (m := _HEAD_LORA.fullmatch(key))}
    for owner, layer, name in sorted(head):
        prefix = f"{owner}.encoder.layer.{layer}.crossattention.self.{name}."
        if owner == "tag_encoder" and int(layer) >= num_tagging_layers:
            continue  # untied tag-encoder layer: dropped by rule
        pair = _pair(ledger, prefix)
        if pair is None:
            continue
        target = f"tagging_head.layers.{layer}.{name}"
        if owner == "tagging_head":
            ledger.lora[target] = pair
        else:
            ledger.folded.setdefault(target, []).append(pair)


def _lora_delta(pair: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    lora_a, lora_b = (t.to(dtype) for t in pair)
    return (lora_b @ lora_a) * (LORA_ALPHA / lora_a.shape[0])


def _check_against_model(ledger: _Ledger, expected: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(ledger.weights))
    unknown = sorted(set(ledger.weights) - set(expected))
    if missing:
        ledger.problems.append(f"missing weights ({len(missing)}): {', '.join(missing[:20])}")
    if unknown:
        ledger.problems.append(f"weights this architecture does not have ({len(unknown)}): {', '.join(unknown[:20])}")
    if unknown or len(missing) > 1:
        ledger.problems.append("(a different number of layers or blocks? check the `architecture` config)")
    pairs = [*ledger.lora.items(), *((target, pair) for target, pairs in ledger.folded.items() for pair in pairs)]
    for target, (lora_a, lora_b) in pairs:
        weight = expected.get(target + ".weight")
        if weight is None:
            ledger.problems.append(f"LoRA for {target}, which this architecture does not have")
        elif lora_b.shape[1] != lora_a.shape[0] or (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
            ledger.problems.append(
                f"LoRA for {target}: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit its weight "
                f"{tuple(weight.shape)}"
            )


def convert_state_dict(
    ram_state_dict: Mapping[str, torch.Tensor],
    dape_state_dict: Mapping[str, torch.Tensor] | None,
    model: DAPEModel,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Original-layout dicts -> (base weights for ``model`` with the tied adapters folded in, LoRA pairs by module).

    The LoRA pairs are (A, B) in PEFT's layout (A (r, in), B (out, r), scaling 1/r), keyed by module name.
    Raises `CheckpointConversionError` listing every key that cannot be accounted for.
    """
    expected = model.state_dict()
    num_tagging_layers = model.config.tagging_num_layers
    ledger = _Ledger(_prepare_sources(ram_state_dict, dape_state_dict or {}))
    for key in ledger.source:
        reason = next((why for pattern, why in DROPPED_KEY_RULES if re.fullmatch(pattern, key)), None)
        if reason and not _TIED.fullmatch(key) and not _HEAD_LORA.fullmatch(key):
            ledger.dropped[key] = reason
            if ".condition_" in key and ledger.source[key].abs().max() > 0:
                logger.warning("%s is non-zero but has no counterpart in DAPE (it only acts with a condition)", key)
    _map_plain(ledger)
    _map_tied_fallbacks(ledger, num_tagging_layers)
    _map_lora(ledger, num_tagging_layers)
    for key in ledger.source:
        if key not in ledger.used and (_TIED.fullmatch(key) or _HEAD_LORA.fullmatch(key)):
            ledger.dropped[key] = "tag encoder (captioning; not used for tagging)"
    _check_against_model(ledger, expected)
    weights = ledger.weights
    for target, value in list(weights.items()):
        if target.endswith("relative_position_bias_table") and target in expected:
            weights[target] = interpolate_relative_position_bias(value, expected[target].shape[0])
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        ledger.problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
    unaccounted = ledger.unaccounted()
    if unaccounted:
        ledger.problems.append(f"unexpected keys ({len(unaccounted)}): {', '.join(unaccounted[:20])}")
    if ledger.problems:
        raise CheckpointConversionError("cannot convert the RAM/DAPE checkpoint:\n- " + "\n- ".join(ledger.problems))
    for target, pairs in ledger.folded.items():
        weight = weights[target + ".weight"]
        for pair in pairs:
            weight = weight + _lora_delta(pair, weight.dtype)
        weights[target + ".weight"] = weight
    logger.info(
        "converted %d keys: %d weights, %d LoRA adapters (+%d tied), %d dropped",
        len(ledger.source),
        len(weights),
        len(ledger.lora),
        len(ledger.folded),
        len(ledger.dropped),
    )
    return weights, ledger.lora


def _floating_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float32


def load_converted(
    model: DAPEModel,
    weights: Mapping[str, torch.Tensor],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
) -> DAPEModel:
    """Load `convert_state_dict`'s output into ``model`` (cast to ``dtype``, default the weights' dtype).

    ``lora`` is merged into the weights, or with ``merge_lora=False`` attached as PEFT adapters. Returns the model
    frozen and in eval mode.
    """
    dtype = dtype or _floating_dtype(list(weights.values()))
    weights = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in weights.items()}
    if merge_lora:
        for target, pair in lora.items():
            weights[target + ".weight"] = weights[target + ".weight"] + _lora_delta(pair, dtype)
    # nn.Module.to: diffusers 0.42's ModelMixin.to warns about fp32 modules on every dtype cast, even with none.
    torch.nn.Module.to(model, dtype).load_state_dict(weights, strict=True)
    if not merge_lora and lora:
        ranks = {a.shape[0] for a, _ in lora.values()}
        if len(ranks) != 1:
            raise CheckpointConversionError(f"unmerged LoRA needs one rank for all modules, got {sorted(ranks)}")
        model.add_lora(rank=ranks.pop(), alpha=LORA_ALPHA)
        with torch.no_grad():
            for target, (lora_a, lora_b) in lora.items():
                module = model.get_submodule(target)
                module.lora_A["default"].weight.copy_(lora_a)
                module.lora_B["default"].weight.copy_(lora_b)
    model.requires_grad_(False)
    return model.eval()


def _check_swin_width(state_dict: Mapping[str, torch.Tensor], model: DAPEModel, ram_path: str | Path) -> None:
    """Refuse a RAM checkpoint of another Swin (e.g. Swin-B) up front, naming the architecture expected."""
    patch = state_dict.get("visual_encoder.patch_embed.proj.weight")
    expected = model.config.embed_dim
    if patch is not None and patch.shape[0] != expected:
        released = " (the released Swin-L RAM, ram_swin_large_14m.pth)" if expected == 192 else ""
        raise CheckpointConversionError(
            f"{ram_path}: a Swin image encoder with embed_dim {patch.shape[0]}, expected embed_dim {expected}"
            f"{released}; for another RAM variant pass its `architecture` config"
        )


def convert_ram_checkpoint(
    ram_path: str | Path,
    dape_path: str | Path | None,
    tag_list_path: str | Path,
    threshold_path: str | Path,
    *,
    architecture: Mapping[str, Any] | None = None,
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
) -> DAPEModel:
    """Build a `DAPEModel` from the released RAM + DAPE files (see the module docstring).

    Args:
        ram_path: ``ram_swin_large_14m.pth``.
        dape_path: ``DAPE.pth``, or None for plain RAM (no degradation-aware LoRA).
        tag_list_path, threshold_path: ``ram_tag_list.txt``, ``ram_tag_list_threshold.txt``.
        architecture: `DAPEModel` config fields other than the tags; default the released Swin-L / 384 model.
        merge_lora: fold the LoRA into the weights (the inference layout). ``False`` attaches it as PEFT adapters
            (for further training); the tied tag-encoder adapters are folded either way.
        dtype: of the result; default the checkpoint's floating dtype.
    """
    tag_names, thresholds = read_tag_list(tag_list_path), read_thresholds(threshold_path)
    if len(thresholds) != len(tag_names):
        raise CheckpointConversionError(
            f"{threshold_path} has {len(thresholds)} thresholds but {tag_list_path} has {len(tag_names)} tags"
        )
    config = {**dict(architecture or {}), "tag_names": tag_names, "tag_thresholds": thresholds}
    ram_state_dict = load_ram_state_dict(ram_path)
    dape_state_dict = load_dape_state_dict(dape_path) if dape_path is not None else None
    label_embed = ram_state_dict.get("label_embed")
    if label_embed is not None and label_embed.shape[0] != len(tag_names):
        raise CheckpointConversionError(
            f"the checkpoint has {label_embed.shape[0]} classes but {tag_list_path} has {len(tag_names)} tags"
        )
    model = DAPEModel(**config)
    _check_swin_width(ram_state_dict, model, ram_path)
    weights, lora = convert_state_dict(ram_state_dict, dape_state_dict, model)
    return load_converted(model, weights, lora, merge_lora=merge_lora, dtype=dtype)


def convert_dape_folder(
    ram_path: str | Path,
    dape_path: str | Path | None,
    tag_list_path: str | Path,
    threshold_path: str | Path,
    output_dir: str | Path,
    *,
    architecture: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert and ``save_pretrained`` the merged model to ``output_dir`` (config.json + safetensors).

    Meant for ``seesr convert``; returns ``output_dir``.
    """
    model = convert_ram_checkpoint(
        ram_path, dape_path, tag_list_path, threshold_path, architecture=architecture, dtype=dtype
    )
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    if progress is not None:
        parameters = sum(p.numel() for p in model.parameters())
        progress(f"wrote {output_dir} ({model.num_classes} tags, {parameters:,} parameters)")
    return output_dir
