"""Tag images with DAPE (the hard prompt), e.g. to prepare SeeSR training captions.

Without --out-dir, prints one `path<TAB>tags` line per image to stdout. With --out-dir, writes `<name>.txt` per
image (the tag string and a newline; written atomically). Unreadable inputs are reported on stderr, one line each,
the others are still tagged, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from seesr.dtypes import DTYPE_NAMES, torch_dtype

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--model", required=True, type=Path, help="DAPE model folder (DAPEModel.save_pretrained)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write <name>.txt files here instead of printing")
    parser.add_argument("--device", default="auto", help="torch device; 'auto' = cuda when available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_NAMES.values()),
        default="float32",
        help="model precision (SeeSR runs DAPE in fp32)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--antialias", action="store_true", help="antialiased resize to 384 (SeeSR's pinned torchvision did not)"
    )


def _report(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")


def _plan_outputs(files: list[Path], out_dir: Path | None) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """(input, output .txt or None) pairs; a second input with the same file stem is an error."""
    if out_dir is None:
        return [(path, None) for path in files], []
    plan, errors, owners = [], [], {}
    for path in files:
        target = out_dir / f"{path.stem}.txt"
        if target in owners:
            errors.append(f"{path}: same output name {target.name} as {owners[target]}; skipped")
            continue
        owners[target] = path
        plan.append((path, target))
    return plan, errors


def _load_model(args: argparse.Namespace):
    import torch

    from dape.model import DAPEModel

    if not args.model.is_dir():
        raise FileNotFoundError(f"--model {args.model}: not a folder (expected a DAPEModel.save_pretrained folder)")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available")
    model = DAPEModel.from_pretrained(args.model, local_files_only=True, torch_dtype=torch_dtype(args.dtype))
    return model.to(device).eval()


def _tag_batch(model, batch: list, antialias: bool) -> list[str]:
    import torch

    with torch.no_grad():
        pixel_values = model.preprocess([image for _, _, image in batch], antialias=antialias)
        return model.tags(logits=model(pixel_values).logits)


def _emit(path: Path, target: Path | None, tags: str) -> None:
    from seesr.image_io import atomic_write_text

    if target is None:
        sys.stdout.write(f"{path}\t{tags}\n")
        sys.stdout.flush()
    else:
        atomic_write_text(target, tags + "\n")


def run(args: argparse.Namespace) -> int:
    from seesr.image_io import ImageLoadError, expand_inputs, load_image

    if args.batch_size < 1:
        _report(f"--batch-size must be >= 1, got {args.batch_size}")
        return 2
    files, errors = expand_inputs(args.inputs)
    plan, plan_errors = _plan_outputs(files, args.out_dir)
    errors += plan_errors
    for line in errors:
        _report(line)
    if not plan:
        _report("no images to tag")
        return 1
    try:
        model = _load_model(args)
    except (OSError, ValueError) as error:
        _report(str(error).splitlines()[0])
        return 2
    failures, tagged = len(errors), 0
    for start in range(0, len(plan), args.batch_size):
        batch = []
        for path, target in plan[start : start + args.batch_size]:
            try:
                batch.append((path, target, load_image(path).rgb))
            except ImageLoadError as error:
                _report(str(error))
                failures += 1
        if not batch:
            continue
        for (path, target, _), tags in zip(batch, _tag_batch(model, batch, args.antialias)):
            try:
                _emit(path, target, tags)
                tagged += 1
            except OSError as error:
                _report(f"{target}: cannot write ({error})")
                failures += 1
    logger.info("tagged %d of %d inputs", tagged, tagged + failures)
    return 1 if failures else 0
