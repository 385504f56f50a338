"""Typed YAML experiment configs: YAML file + `key=value` overrides -> (nested) dataclasses.

Unknown keys and values of the wrong type are errors that name the dotted key; the dataclasses'
`__post_init__` validation runs as usual. Supported field types: bool, int, float (ints and float strings such
as `1e-4` accepted), str, Path, `X | None`, unions, `Literal[...]`, `list[X]`, `tuple[X, ...]`, `tuple[X, Y]`,
`dict[str, X]`, nested dataclasses and `Any`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from seesr.image_io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match its dataclass; the message names the dotted key."""


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is list:
            return [_convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items ({_describe(tp)}), got {len(value)}: {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args or [Any] * len(value), value)))
    if origin is dict and isinstance(value, dict):
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads `1e-4` as a string
        except ValueError:
            pass
    elif tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    elif isinstance(tp, type) and origin is None and isinstance(value, tp):
        if not (tp is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def _describe(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _build(cls: type[T], data: Any, prefix: str = "") -> T:
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key; valid keys: {sorted(fields)}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else str(k)) for k, v in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: required key is missing")
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value or a.b=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            if node.get(part) is not None:
                raise ConfigError(f"{'.'.join(parents[: i + 1])}: is not a block, cannot set {key.strip()!r}")
            node[part] = {}
        node = node[part]
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Build `cls` (a dataclass) from a YAML file (or only defaults when `path` is None) plus overrides.

    Each override is `key=value` or `a.b=value`; the value is parsed with `yaml.safe_load` (`lr=1e-4`,
    `flags=[a,b]`, `resume=null`). Raises ConfigError naming the key for unknown keys and wrong types.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides or []:
        _apply_override(data, item)
    return _build(cls, data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe data (tuples become lists, paths strings)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"cfg must be a dataclass instance, got {type(cfg).__name__}")
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(type(cfg), path)` reads it back."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def parse_cli(description: str, argv: list[str] | None) -> tuple[Path | None, list[str]]:
    """``--config``, run-level flags and ``key=value`` overrides -> (config path, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None, help="YAML config")
    parser.add_argument("--output_dir", default=None, help="train.output_dir")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint-N folder (train.resume)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed")
    parser.add_argument("--report_to", default=None, choices=["tensorboard", "none"], help="train.report_to")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_train_steps=100")
    parsed = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(parsed.overrides)
    for name in ("output_dir", "resume", "seed", "report_to"):
        if getattr(parsed, name) is not None:
            overrides.append(f"train.{name}={getattr(parsed, name)}")
    return parsed.config, overrides


def config_from_cli(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    """A trainer's config from its command line (`parse_cli`): ``--config`` YAML, run flags, ``key=value``."""
    path, overrides = parse_cli(description, argv)
    return load_config(cls, path, overrides)
