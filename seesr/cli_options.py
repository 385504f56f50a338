"""Options shared by every `seesr` command: one name, one vocabulary and one help text per concept.

Commands build their parsers from these helpers so that `-o/--output`, `--model`, `--dtype`, `--device` and
`--overwrite` mean the same everywhere. Old spellings stay accepted as hidden aliases (`HIDDEN_ALIASES`: parsed,
not shown in `--help`). Standard library only (the `seesr --help` start-up stays fast). It lives beside `seesr.cli`
rather than in it because `dape.command` (`seesr tag`) uses it too and dape does not import `seesr.cli`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from seesr import dtypes as _dtypes

#: Every accepted `--dtype` spelling -> the canonical short name.
DTYPE_NAMES: dict[str, str] = {
    "fp32": "fp32",
    "float32": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
#: Canonical short name -> the torch dtype attribute.
TORCH_DTYPES: dict[str, str] = _dtypes.DTYPE_NAMES  # the one table (seesr.dtypes)
#: Option strings kept for compatibility: parsed, never shown in `--help`.
HIDDEN_ALIASES: frozenset[str] = frozenset({"--output-dir", "--out-dir", "--out"})


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default (not for on/off flags) and hides the compatibility aliases."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if s not in HIDDEN_ALIASES]
        if len(shown) == len(action.option_strings):
            return super()._format_action_invocation(action)
        copy = argparse.Action(shown, action.dest, nargs=action.nargs, metavar=action.metavar)
        copy.choices, copy.default, copy.type = action.choices, action.default, action.type
        return super()._format_action_invocation(copy)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in text:
            return text
        return super()._get_help_string(action)


def dtype(text: str) -> str:
    """argparse type for `--dtype`: fp32|fp16|bf16 or float32|float16|bfloat16 -> the short name."""
    name = DTYPE_NAMES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"expected fp32, fp16 or bf16 (or float32, float16, bfloat16), got {text!r}")
    return name


def torch_dtype(name: str):
    """The torch dtype for a `--dtype` value (either spelling)."""
    import torch

    return getattr(torch, TORCH_DTYPES[dtype(name)])


def number(kind: type, minimum: float | None = None, allow_none: bool = False):
    """argparse type: an int or float >= `minimum`; with `allow_none`, 'none'/'off' give the string 'off'."""

    def parse(text: str):
        if allow_none and text.lower() in ("none", "off"):
            return "off"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or (minimum is not None and value < minimum):  # NaN or too small
            raise argparse.ArgumentTypeError(f"expected a value >= {minimum}, got {text!r}")
        return value

    return parse


def add_output(parser, help: str, required: bool = True, aliases: tuple[str, ...] = (), type=Path, **kwargs) -> None:
    """`-o/--output` (plus hidden old spellings in `aliases`)."""
    parser.add_argument("-o", "--output", *aliases, dest="output", required=required, type=type, help=help, **kwargs)


def add_model(parser, help: str, required: bool = False, type=str) -> None:
    parser.add_argument("--model", required=required, type=type, help=help)


def add_dtype(parser, default: str = "fp32", help: str = "model precision") -> None:
    parser.add_argument(
        "--dtype",
        type=dtype,
        default=default,
        metavar="{fp32,fp16,bf16}",
        help=f"{help}; float32/float16/bfloat16 are accepted too",
    )


def add_device(parser, help: str = "torch device (default: cuda when available, else cpu)") -> None:
    parser.add_argument("--device", default=None, help=help)


def add_overwrite(parser, help: str = "replace existing outputs (default: skip them)") -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def half_on_cpu_warning(dtype_name: str, device_type: str) -> str | None:
    """The reason not to run fp16 on a CPU (slow and overflow-prone), or None when it does not apply."""
    if dtype_name == "fp16" and device_type == "cpu":
        return (
            "--dtype fp16 on CPU: most CPUs have no fast float16 kernels (measured 2.4x slower than fp32 here) and "
            "half precision can overflow to NaN; use --dtype fp32, or bf16 on CPUs with bfloat16 support"
        )
    return None
