"""LoRA on DAPE through PEFT, placed where DAPE (SeeSR) places it.

DAPE fine-tunes RAM with ``loralib`` adapters of rank 8 and ``lora_alpha=1`` (scaling 1/8):

- every Swin window attention: the query and value projections (``MergedLinear`` with
  ``enable_lora=[True, False, True]`` on the fused qkv in the original; separate modules here);
- every tagging-head cross-attention: the query and key projections (the value has none).

Here the adapters are ordinary PEFT ``LoraLayer``s injected by module name. For inference they are merged into the
base weights and removed (`merge_lora`), so a saved DAPE folder holds plain weights.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LORA_RANK = 8
LORA_ALPHA = 1.0
#: PEFT ``target_modules`` pattern (full match against module names of a `DAPEModel`).
LORA_TARGET_MODULES = (
    r"image_encoder\.layers\.\d+\.blocks\.\d+\.attn\.(query|value)|tagging_head\.layers\.\d+\.(query|key)"
)


def lora_config(rank: int = LORA_RANK, alpha: float = LORA_ALPHA, dropout: float = 0.0) -> LoraConfig:
    """The PEFT config of DAPE's adapters (rank 8, alpha 1, no dropout, no bias by default)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        init_lora_weights=True,
    )


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def add_lora(
    model: nn.Module,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    """Inject trainable LoRA adapters in place (A: Kaiming-uniform, B: zeros, so the output is unchanged).

    Afterwards only the LoRA parameters require gradients. Returns ``model``.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them first with merge_lora()")
    inject_adapter_in_model(lora_config(rank, alpha, dropout), model, adapter_name=adapter_name)
    return model


def _split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base ``nn.Linear`` and put the plain layer back. Returns ``model``.

    Afterwards the state dict has the plain layout (no ``base_layer``/``lora_`` keys) and every parameter is
    frozen: call `add_lora` again to train further.
    """
    lora_modules = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in lora_modules:
        module.merge(safe_merge=True)
        parent_name, child = _split_name(name)
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(False)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of ``model`` (for training checkpoints), keyed by their module names."""
    return {key: value for key, value in model.state_dict().items() if ".lora_" in key}
