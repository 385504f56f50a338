"""Prepare the default TGSR training data, and check that a config's training data exists before anything heavy.

    python -m seesr.data.tgsr_prepare data/tgsr   # -> data/tgsr/train, held_out (photos), details (synthetic)

`data/tgsr/train` and `data/tgsr/held_out`: the photos shipped in installed packages with the captions of
`configs/tgsr_captions.yaml` (`seesr.tgsr_data.prepare_package_photos`); `data/tgsr/details`: the synthetic
captioned detail set (`seesr.data.tgsr_synthetic.prepare_detail_set`).

`check_training_data(argv)` is called by `train_tgsr.py` first: it reads only the YAML config and the
`data.train_data` override (standard library + yaml), so a missing folder fails at once with the command to run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_ROOT = "data/tgsr"
PREPARE_COMMAND = f"python -m seesr.data.tgsr_prepare {DEFAULT_ROOT}"


def _source_paths(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item if isinstance(item, str) else str(item.get("path", "")) for item in value if item]
    return []


def check_training_data(argv: list[str]) -> None:
    """Exit with a one-line error and the exact command when the configured training data does not exist."""
    import yaml

    config_path, value = None, None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("data.train_data="):
            value = yaml.safe_load(arg.split("=", 1)[1])
    if value is None and config_path is not None and Path(config_path).is_file():
        try:
            value = (
                (yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}).get("data", {}).get("train_data")
            )
        except (yaml.YAMLError, AttributeError):
            return  # the full config loader reports malformed files precisely
    missing = [path for path in _source_paths(value) if path and not Path(path).exists()]
    if not missing:
        return
    if all(Path(path).parent == Path(DEFAULT_ROOT) for path in missing):
        hint = f"prepare the default training data first: `{PREPARE_COMMAND}` (or set data.train_data=YOUR_FOLDER)"
    else:
        hint = "expected a folder of name.png + name.txt or a .jsonl file"
    sys.exit(f"data.train_data: {', '.join(missing)} not found (working directory {Path.cwd()}); {hint}")


def prepare(root: str | Path, detail_count: int = 1024, seed: int = 0) -> None:
    """Write the photos (`root/train`, `root/held_out`) and the synthetic detail set (`root/details`)."""
    from seesr.data.captioned import prepare_package_photos
    from seesr.data.tgsr_synthetic import prepare_detail_set

    root = Path(root)
    prepare_package_photos(root)
    prepare_detail_set(root / "details", count=detail_count, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the default TGSR training data (photos + detail set).")
    parser.add_argument("root", nargs="?", default=DEFAULT_ROOT, help=f"output folder (default {DEFAULT_ROOT})")
    parser.add_argument("--detail_count", type=int, default=1024, help="synthetic detail images (64 px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prepare(args.root, args.detail_count, args.seed)


if __name__ == "__main__":
    main()
