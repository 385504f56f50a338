"""One-step LoRA surgery (OSEDiff, NeurIPS 2024) on stock diffusers models, and the released ``osediff.pkl`` layout.

OSEDiff fine-tunes Stable Diffusion 2.1-base with peft LoRA (``osediff.py: initialize_unet / initialize_vae``):

- UNet: three adapters over every non-bias, non-norm weight whose name contains one of :data:`UNET_LORA_PATTERNS`:
  ``default_encoder`` (``down_blocks.*`` and ``conv_in``), ``default_decoder`` (``up_blocks.*`` and ``conv_out``)
  and ``default_others`` (the rest, i.e. ``mid_block.*``). ``conv_in`` is also trained in full (base + LoRA).
- VAE: one adapter ``default_encoder`` over the encoder's convs / attention projections and ``quant_conv`` (not
  ``post_quant_conv``); the decoder stays frozen.
- Rank 4, ``lora_alpha`` 8 (peft's default), so the LoRA scale is 2.0; ``init_lora_weights="gaussian"``.

Public API (stable; the one-step trainer builds on it):

- :func:`unet_lora_target_modules` / :func:`vae_lora_target_modules`: the module-name lists exactly as the original
  builds them (the VAE list keeps the original's duplicates, as ``osediff.pkl`` stores them).
- :func:`add_unet_lora` / :func:`add_vae_lora`: add the adapters (all active) and return the lists.
- :func:`trainable_parameter_names` / :func:`set_trainable`: what the original trains (every LoRA tensor, plus
  ``conv_in``'s base), and freezing everything else.
- :func:`read_osediff_checkpoint` (safe, strict), :func:`load_osediff_checkpoint` (adapters + tensors into models),
  :func:`osediff_checkpoint` / :func:`save_osediff_checkpoint` (models -> the released dict layout).
- :func:`fuse_lora` (merge every adapter into the base weights and remove the peft layers), :func:`has_lora`.
- :func:`onestep_x0`: the DDPM step at t=999 to x0 with the scheduler's float32 alpha-bar, as the original.
- :class:`OneStepUNet2DConditionModel` / :class:`OneStepAutoencoderKL`: the stock classes whose
  ``save_pretrained`` / ``from_pretrained`` also carry the adapters (``onestep_lora.safetensors`` + ``.json`` next
  to the base weights, which stay a plain diffusers folder). :func:`as_onestep_model` adopts a stock instance.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (the pipeline loader looks it up here)

logger = logging.getLogger(__name__)

UNET_LORA_PATTERNS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)
VAE_LORA_PATTERNS = (
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv",
    "conv_out",
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
)
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"
LORA_RANK = 4
LORA_ALPHA = 8  # peft's default, which the original leaves in place: scale = 8 / 4 = 2.0
ONESTEP_TIMESTEP = 999

#: The released ``osediff.pkl`` dict's keys (``OSEDiff_gen.save_model``), in the original's order.
CHECKPOINT_KEYS = (
    "vae_lora_encoder_modules",
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "rank_unet",
    "rank_vae",
    "state_dict_unet",
    "state_dict_vae",
)
LORA_WEIGHTS_NAME = "onestep_lora.safetensors"
LORA_CONFIG_NAME = "onestep_lora.json"


class OSEDiffCheckpointError(ValueError):
    """An ``osediff.pkl`` (or a saved adapter file) does not match the layout or the models."""


# Target modules, as the original builds them ---------------------------------------------------------------------


def _base_parameter_names(model: torch.nn.Module) -> list[str]:
    """Parameter names of the model without adapters (peft's ``.base_layer`` folded back, LoRA tensors skipped)."""
    return [n.replace(".base_layer", "") for n, _ in model.named_parameters() if "lora_" not in n]


def unet_lora_target_modules(unet: torch.nn.Module) -> dict[str, list[str]]:
    """``{adapter name: module names}`` for the UNet, as ``initialize_unet`` builds them (first pattern wins)."""
    targets: dict[str, list[str]] = {name: [] for name in UNET_ADAPTERS}
    for name in _base_parameter_names(unet):
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_LORA_PATTERNS:
            if pattern not in name:
                continue
            if "down_blocks" in name or "conv_in" in name:
                adapter = "default_encoder"
            elif "up_blocks" in name or "conv_out" in name:
                adapter = "default_decoder"
            else:
                adapter = "default_others"
            targets[adapter].append(name.replace(".weight", ""))
            break
    return targets


def vae_lora_target_modules(vae: torch.nn.Module) -> list[str]:
    """The VAE encoder's module names as ``initialize_vae`` builds them: one entry per matching pattern (so with
    duplicates), and ``quant_conv`` once per pattern."""
    targets = []
    for name in _base_parameter_names(vae):
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_LORA_PATTERNS:
            if pattern in name and "encoder" in name:
                targets.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                targets.append(name.replace(".weight", ""))
    return targets


# Adding adapters -------------------------------------------------------------------------------------------------


def _lora_config(rank: int, target_modules: list[str]):
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if not target_modules:
        raise ValueError("target_modules: expected at least one module name, got none")
    return LoraConfig(
        r=rank, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=list(dict.fromkeys(target_modules))
    )


def add_unet_lora(
    unet: UNet2DConditionModel, rank: int = LORA_RANK, target_modules: Mapping[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Add OSEDiff's three UNet adapters (all active); returns ``{adapter name: module names}``.

    ``target_modules`` defaults to :func:`unet_lora_target_modules`; LoRA weights start gaussian (A) / zero (B).
    """
    targets = (
        unet_lora_target_modules(unet) if target_modules is None else {k: list(v) for k, v in target_modules.items()}
    )
    if set(targets) != set(UNET_ADAPTERS):
        raise ValueError(f"target_modules: expected the adapters {list(UNET_ADAPTERS)}, got {list(targets)}")
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for adapter in UNET_ADAPTERS:
            unet.add_adapter(_lora_config(rank, targets[adapter]), adapter_name=adapter)
    unet.set_adapter(list(UNET_ADAPTERS))
    return targets


def add_vae_lora(vae: AutoencoderKL, rank: int = LORA_RANK, target_modules: list[str] | None = None) -> list[str]:
    """Add OSEDiff's VAE-encoder adapter ``default_encoder`` (active); returns its module names."""
    targets = vae_lora_target_modules(vae) if target_modules is None else list(target_modules)
    vae.add_adapter(_lora_config(rank, targets), adapter_name=VAE_ADAPTER)
    vae.set_adapter([VAE_ADAPTER])
    return targets


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """What OSEDiff trains in ``model``: every LoRA tensor and (UNet) every ``conv_in`` tensor."""
    full = "conv_in" if isinstance(model, UNet2DConditionModel) else None
    return [n for n, _ in model.named_parameters() if "lora" in n or (full is not None and full in n)]


def set_trainable(model: torch.nn.Module) -> list[str]:
    """Freeze ``model`` except what OSEDiff trains (:func:`trainable_parameter_names`); returns those names."""
    names = trainable_parameter_names(model)
    keep = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return names


def has_lora(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, peft layer) for every peft layer, outermost first."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            yield (model.get_submodule(parent_name) if parent_name else model), child, module


def fuse_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every active adapter into its base weight and put the plain base modules back (in place).

    The result is a stock model whose outputs equal the adapted model's to rounding.
    """
    for parent, child, layer in _lora_layers(model):
        layer.merge(adapter_names=list(layer.active_adapters))
        setattr(parent, child, layer.get_base_layer())
    for attribute in ("peft_config",):
        if hasattr(model, attribute):
            delattr(model, attribute)
    model._hf_peft_config_loaded = False
    return model


@contextmanager
def base_layers_only(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block the model's peft layers are swapped for their base layers (shared parameters, no copy), so
    ``state_dict`` / ``save_pretrained`` see the plain diffusers layout; the adapters come back afterwards."""
    swapped = [(parent, child, layer) for parent, child, layer in _lora_layers(model)]
    for parent, child, layer in swapped:
        setattr(parent, child, layer.get_base_layer())
    try:
        yield model
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


# The x0 step -----------------------------------------------------------------------------------------------------


def onestep_x0(
    sample: torch.Tensor, noise_pred: torch.Tensor, alphas_cumprod: torch.Tensor, timestep: int = ONESTEP_TIMESTEP
) -> torch.Tensor:
    """``(z - sqrt(1 - abar_t) * eps) / sqrt(abar_t)`` with the scheduler's float32 ``alphas_cumprod``.

    Computed as ``DDPMScheduler.step`` does after ``set_timesteps(1)`` (whose added variance is 1e-10 x noise): the
    coefficients are float32 (1,) tensors, so the result is float32 for fp16 / bf16 inputs and float64 for float64.
    """
    alpha_prod = alphas_cumprod.to(sample.device)[[timestep]]
    beta_prod = 1 - alpha_prod
    return (sample - beta_prod**0.5 * noise_pred) / alpha_prod**0.5


# The released checkpoint -----------------------------------------------------------------------------------------


@dataclass
class OSEDiffCheckpoint:
    """The contents of ``osediff.pkl``, field for field (module lists as stored, duplicates included)."""

    vae_lora_encoder_modules: list[str]
    unet_lora_encoder_modules: list[str]
    unet_lora_decoder_modules: list[str]
    unet_lora_others_modules: list[str]
    rank_unet: int
    rank_vae: int
    state_dict_unet: dict[str, torch.Tensor] = field(repr=False)
    state_dict_vae: dict[str, torch.Tensor] = field(repr=False)

    @property
    def unet_target_modules(self) -> dict[str, list[str]]:
        return dict(
            zip(
                UNET_ADAPTERS,
                (self.unet_lora_encoder_modules, self.unet_lora_decoder_modules, self.unet_lora_others_modules),
                strict=True,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """The released dict layout (what ``torch.save`` writes)."""
        return {key: getattr(self, key) for key in CHECKPOINT_KEYS}


def _validate_checkpoint_dict(data: Any, source: str) -> OSEDiffCheckpoint:
    if not isinstance(data, Mapping):
        raise OSEDiffCheckpointError(
            f"{source}: expected a dict with {list(CHECKPOINT_KEYS)}, got {type(data).__name__}"
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in data]
    unexpected = sorted(str(k) for k in data if k not in CHECKPOINT_KEYS)
    if missing or unexpected:
        raise OSEDiffCheckpointError(f"{source}: missing entries {missing}, unexpected entries {unexpected}")
    for key in CHECKPOINT_KEYS[:4]:
        value = data[key]
        if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
            raise OSEDiffCheckpointError(f"{source}: {key} must be a non-empty list of module names")
    for key in ("rank_unet", "rank_vae"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
            raise OSEDiffCheckpointError(f"{source}: {key} must be a positive integer, got {data[key]!r}")
    for key in ("state_dict_unet", "state_dict_vae"):
        state = data[key]
        if not isinstance(state, Mapping):
            raise OSEDiffCheckpointError(f"{source}: {key} must be a dict of tensors, got {type(state).__name__}")
        bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise OSEDiffCheckpointError(f"{source}: {key} has non-tensor entries {bad[:5]}")
    return OSEDiffCheckpoint(
        **{key: list(data[key]) if key in CHECKPOINT_KEYS[:4] else data[key] for key in CHECKPOINT_KEYS[:6]},
        state_dict_unet=dict(data["state_dict_unet"]),
        state_dict_vae=dict(data["state_dict_vae"]),
    )


def read_osediff_checkpoint(path: str | os.PathLike) -> OSEDiffCheckpoint:
    """Read a released ``osediff.pkl`` safely (``torch.load(weights_only=True)``: tensors, lists, dicts, ints and
    strings only, never arbitrary objects) and check its layout; raises :class:`OSEDiffCheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise OSEDiffCheckpointError(f"{path}: OSEDiff checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler refuses anything but plain containers and tensors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSEDiffCheckpointError(f"{path}: not a loadable OSEDiff checkpoint ({first})") from None
    return _validate_checkpoint_dict(data, str(path))


def _copy_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], expected: list[str], what: str) -> None:
    """Copy ``state`` into ``model``'s parameters named ``expected``; every tensor used, none missing."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OSEDiffCheckpointError(
            f"{what}: {len(missing)} missing tensors {missing[:5]}, {len(unexpected)} unexpected tensors "
            f"{unexpected[:5]} (the base model's architecture must match the checkpoint's)"
        )
    params = dict(model.named_parameters())
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(params[k].shape)}"
        for k in expected
        if state[k].shape != params[k].shape
    ]
    if wrong:
        raise OSEDiffCheckpointError(f"{what}: shape mismatches {wrong[:5]}")
    with torch.no_grad():
        for key in expected:
            params[key].copy_(state[key])


def load_osediff_checkpoint(
    checkpoint: OSEDiffCheckpoint | str | os.PathLike, unet: UNet2DConditionModel, vae: AutoencoderKL
) -> None:
    """Add the checkpoint's adapters to ``unet`` and ``vae`` (base SD weights) and copy its tensors, strictly: the
    UNet's LoRA and ``conv_in`` tensors and the VAE's LoRA tensors must be exactly the checkpoint's."""
    if not isinstance(checkpoint, OSEDiffCheckpoint):
        checkpoint = read_osediff_checkpoint(checkpoint)
    if has_lora(unet) or has_lora(vae):
        raise ValueError("load_osediff_checkpoint: the models already carry adapters; pass base models")
    add_unet_lora(unet, checkpoint.rank_unet, checkpoint.unet_target_modules)
    add_vae_lora(vae, checkpoint.rank_vae, checkpoint.vae_lora_encoder_modules)
    expected_unet = [n for n, _ in unet.named_parameters() if "lora" in n or "conv_in" in n]
    _copy_strict(unet, checkpoint.state_dict_unet, expected_unet, "state_dict_unet")
    _copy_strict(
        vae, checkpoint.state_dict_vae, [n for n, _ in vae.named_parameters() if "lora" in n], "state_dict_vae"
    )
    unet.set_adapter(list(UNET_ADAPTERS))
    vae.set_adapter([VAE_ADAPTER])


def _adapter_rank(model: torch.nn.Module, adapter: str) -> int:
    return int(model.peft_config[adapter].r)


def osediff_checkpoint(unet: UNet2DConditionModel, vae: AutoencoderKL) -> OSEDiffCheckpoint:
    """The released layout for models carrying OSEDiff's adapters (module lists rebuilt as the original builds
    them; tensors detached copies on the CPU)."""
    for model, adapters in ((unet, UNET_ADAPTERS), (vae, (VAE_ADAPTER,))):
        present = set(getattr(model, "peft_config", {}))
        if present != set(adapters):
            raise ValueError(
                f"{type(model).__name__}: expected the adapters {list(adapters)}, found {sorted(present)}"
            )
    targets = unet_lora_target_modules(unet)
    return OSEDiffCheckpoint(
        vae_lora_encoder_modules=vae_lora_target_modules(vae),
        unet_lora_encoder_modules=targets["default_encoder"],
        unet_lora_decoder_modules=targets["default_decoder"],
        unet_lora_others_modules=targets["default_others"],
        rank_unet=_adapter_rank(unet, "default_encoder"),
        rank_vae=_adapter_rank(vae, VAE_ADAPTER),
        state_dict_unet={
            k: v.detach().cpu().clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k
        },
        state_dict_vae={k: v.detach().cpu().clone() for k, v in vae.state_dict().items() if "lora" in k},
    )


def save_osediff_checkpoint(unet: UNet2DConditionModel, vae: AutoencoderKL, path: str | os.PathLike) -> Path:
    """Write ``osediff.pkl`` in the released layout (``torch.save`` of the dict, as ``OSEDiff_gen.save_model``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(osediff_checkpoint(unet, vae).to_dict(), tmp)
    tmp.replace(path)
    return path


# Saved folders that carry their adapters ------------------------------------------------------------------------


def lora_layout(model: torch.nn.Module) -> dict[str, Any]:
    """JSON-able description of the model's adapters: ``{adapter: {"r", "lora_alpha", "target_modules"}}`` plus
    the active adapters."""
    adapters = {
        name: {"r": int(cfg.r), "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
        for name, cfg in getattr(model, "peft_config", {}).items()
    }
    active = sorted({a for _, _, layer in _lora_layers(model) for a in layer.active_adapters})
    return {"adapters": adapters, "active_adapters": active}


def apply_lora_layout(model: torch.nn.Module, layout: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Re-create the adapters described by :func:`lora_layout` and load their tensors strictly."""
    from peft import LoraConfig

    try:
        adapters, active = layout["adapters"], list(layout["active_adapters"])
        for name, cfg in adapters.items():
            config = LoraConfig(
                r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"], init_lora_weights="gaussian",
                target_modules=list(cfg["target_modules"]),
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                model.add_adapter(config, adapter_name=name)
    except (KeyError, TypeError, ValueError) as error:
        raise OSEDiffCheckpointError(f"{LORA_CONFIG_NAME}: malformed adapter description ({error})") from None
    _copy_strict(model, state, [n for n, _ in model.named_parameters() if "lora_" in n], LORA_WEIGHTS_NAME)
    model.set_adapter(active)


class _OneStepLoRAMixin:
    """``save_pretrained`` writes the plain diffusers folder plus the adapters; ``from_pretrained`` restores them."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        from safetensors.torch import save_file

        with base_layers_only(self):
            super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        for name in (LORA_WEIGHTS_NAME, LORA_CONFIG_NAME):
            (folder / name).unlink(missing_ok=True)
        if has_lora(self):
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if "lora_" in k}
            save_file(state, str(folder / LORA_WEIGHTS_NAME))
            (folder / LORA_CONFIG_NAME).write_text(json.dumps(lora_layout(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        files = _lora_files(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if files is not None:
            from safetensors.torch import load_file

            layout = json.loads(Path(files[1]).read_text())
            apply_lora_layout(model, layout, load_file(files[0]))
        return model


def _lora_files(path: str | os.PathLike, subfolder: str | None) -> tuple[str, str] | None:
    """(weights, config) of a saved folder's adapters, or None when it has none."""
    folder = Path(path) / (subfolder or "")
    if Path(path).is_dir():
        if not (folder / LORA_CONFIG_NAME).is_file():
            return None
        if not (folder / LORA_WEIGHTS_NAME).is_file():
            raise OSEDiffCheckpointError(f"{folder}: {LORA_CONFIG_NAME} without {LORA_WEIGHTS_NAME}")
        return str(folder / LORA_WEIGHTS_NAME), str(folder / LORA_CONFIG_NAME)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        config = hf_hub_download(str(path), LORA_CONFIG_NAME, subfolder=subfolder)
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:  # offline and not cached: a stock folder, or adapters never downloaded
        logger.warning("%s: offline and no cached %s; loading without one-step adapters", path, LORA_CONFIG_NAME)
        return None
    return hf_hub_download(str(path), LORA_WEIGHTS_NAME, subfolder=subfolder), config


class OneStepUNet2DConditionModel(_OneStepLoRAMixin, UNet2DConditionModel):
    """A stock ``UNet2DConditionModel`` whose saved folders also carry its peft adapters (see module docs)."""


class OneStepAutoencoderKL(_OneStepLoRAMixin, AutoencoderKL):
    """A stock ``AutoencoderKL`` whose saved folders also carry its peft adapters (see module docs)."""


_ONESTEP_CLASSES = {UNet2DConditionModel: OneStepUNet2DConditionModel, AutoencoderKL: OneStepAutoencoderKL}


def as_onestep_model(model: torch.nn.Module) -> torch.nn.Module:
    """Adopt a stock ``UNet2DConditionModel`` / ``AutoencoderKL`` as its one-step class, in place (the subclass
    adds no state, only adapter-aware saving); other classes are returned unchanged."""
    cls = _ONESTEP_CLASSES.get(type(model))
    if cls is not None:
        model.__class__ = cls
    return model
