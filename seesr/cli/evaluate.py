"""Score super-resolved images against ground truth (PSNR/SSIM on Y, optional pyiqa metrics).

Images are paired by file stem (`pred/0001.png` with `gt/0001.png`, any image suffix, sub-folders searched).
Missing pairs, size mismatches and unreadable files are reported one line each and make the exit status 1; the
other pairs are still scored. Per-image scores and means go to JSON (`--out`) and/or CSV (`--csv`), together with
the settings (crop border, Y channel, metrics, package versions); both are written atomically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_METRICS = "psnr,ssim"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="folder of super-resolved images")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth images")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels removed from each side (default 0)")
    parser.add_argument(
        "--metrics",
        default=DEFAULT_METRICS,
        help="comma-separated: psnr, ssim, and with pyiqa installed lpips, dists, niqe, musiq, maniqa, clipiqa "
        f"(default {DEFAULT_METRICS})",
    )
    parser.add_argument("--rgb", action="store_true", help="compute PSNR/SSIM on RGB instead of the Y channel")
    parser.add_argument("--out", type=Path, default=None, help="write per-image scores and means as JSON here")
    parser.add_argument("--csv", type=Path, default=None, help="write per-image scores and means as CSV here")
    parser.add_argument("--device", default=None, help="device for pyiqa metrics (default: cuda if available)")


def _parse_metrics(text: str) -> list[str]:
    from seesr.metrics import BUILTIN_METRICS, PYIQA_METRICS

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_METRICS + PYIQA_METRICS]
    if not names or unknown:
        raise ValueError(
            f"--metrics {text!r}: unknown metric {unknown[0] if unknown else '(none)'!r}; "
            f"expected a comma-separated list of {', '.join(BUILTIN_METRICS + PYIQA_METRICS)}"
        )
    return list(dict.fromkeys(names))


def _index_by_stem(folder: Path, label: str, errors: list[str]) -> dict[str, Path]:
    from seesr.image_io import expand_inputs

    files, problems = expand_inputs([str(folder)])
    errors.extend(problems)
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            others = ", ".join(str(p) for p in paths[1:])
            errors.append(f"{paths[0]}: {label} stem {stem!r} is ambiguous (also {others}); skipped")
    return {stem: paths[0] for stem, paths in by_stem.items() if len(paths) == 1}


def pair_images(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, pred, gt) triples matched by file stem, sorted by name, and one line per unmatched/ambiguous file."""
    errors: list[str] = []
    preds = _index_by_stem(pred_dir, "prediction", errors)
    gts = _index_by_stem(gt_dir, "ground-truth", errors)
    errors += [f"{gts[s]}: no prediction with stem {s!r} in {pred_dir}" for s in sorted(gts.keys() - preds.keys())]
    errors += [f"{preds[s]}: no ground truth with stem {s!r} in {gt_dir}" for s in sorted(preds.keys() - gts.keys())]
    return [(s, preds[s], gts[s]) for s in sorted(preds.keys() & gts.keys())], errors


def _versions(pyiqa_used: bool) -> dict[str, str]:
    from importlib import metadata

    names = ["seesr", "numpy", "pillow"] + (["pyiqa", "torch"] if pyiqa_used else [])
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def evaluate_folders(
    pred_dir: Path, gt_dir: Path, metrics: list[str], crop_border: int = 0, y_channel: bool = True,
    device: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Score every stem-matched pair; returns {"settings", "mean", "images", "errors"} (errors: one line each)."""
    import numpy as np

    from seesr import metrics as m
    from seesr.image_io import ImageLoadError, load_image

    iqa = {name: m.PyiqaMetric(name, device) for name in metrics if name in m.PYIQA_METRICS}
    pairs, errors = pair_images(pred_dir, gt_dir)
    rows: list[dict[str, Any]] = []
    for name, pred_path, gt_path in pairs:
        try:
            pred, gt = np.asarray(load_image(pred_path).rgb), np.asarray(load_image(gt_path).rgb)
            if pred.shape != gt.shape:
                raise ValueError(f"size {pred.shape[1]}x{pred.shape[0]} differs from ground truth "
                                 f"{gt_path} ({gt.shape[1]}x{gt.shape[0]})")  # fmt: skip
            row: dict[str, Any] = {"name": name, "pred": str(pred_path), "gt": str(gt_path)}
            for metric in metrics:
                if metric == "psnr":
                    row[metric] = m.psnr(pred, gt, crop_border, y_channel)
                elif metric == "ssim":
                    row[metric] = m.ssim(pred, gt, crop_border, y_channel)
                else:
                    row[metric] = iqa[metric](pred, gt, crop_border)
        except ImageLoadError as exc:
            errors.append(str(exc))
            continue
        except ValueError as exc:
            errors.append(f"{pred_path}: {exc}")
            continue
        rows.append(row)
        logger.debug("%s: %s", name, {k: row[k] for k in metrics})
    settings = {
        "pred": str(pred_dir), "gt": str(gt_dir), "metrics": metrics, "crop_border": crop_border,
        "y_channel": y_channel, "color_space": "BT.601 Y, 0-255 scale, unrounded" if y_channel else "RGB 0-255",
        "ssim": {"window": m.SSIM_WINDOW, "sigma": m.SSIM_SIGMA, "c1": m.SSIM_C1, "c2": m.SSIM_C2, "region": "valid"},
        "lower_is_better": sorted(set(metrics) & m.LOWER_IS_BETTER), "pairing": "file stem",
        "versions": _versions(bool(iqa)),
    }  # fmt: skip
    mean = {k: float(np.mean([r[k] for r in rows])) if rows else None for k in metrics}
    return {"settings": settings, "mean": mean, "count": len(rows), "images": rows, "errors": errors}


def _jsonable(value: Any) -> Any:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" (identical images) and "nan" are not valid JSON numbers
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    import json

    from seesr.image_io import atomic_write_text

    atomic_write_text(path, json.dumps(_jsonable(results), indent=2) + "\n")


def write_csv(results: dict[str, Any], path: Path) -> None:
    """One row per image plus a final `mean` row; the settings go to `<stem>.settings.json` beside it."""
    import csv
    import io
    import json

    from seesr.image_io import atomic_write_text

    metrics = results["settings"]["metrics"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", *metrics])
    for row in results["images"]:
        writer.writerow([row["name"], *(repr(float(row[k])) for k in metrics)])
    writer.writerow(["mean", *("" if results["mean"][k] is None else repr(results["mean"][k]) for k in metrics)])
    atomic_write_text(path, buffer.getvalue())
    settings = path.with_name(path.stem + ".settings.json")
    atomic_write_text(settings, json.dumps(_jsonable(results["settings"]), indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    try:
        metrics = _parse_metrics(args.metrics)
        if args.crop_border < 0:
            raise ValueError(f"--crop-border must be >= 0, got {args.crop_border}")
        for label, folder in (("--pred", args.pred), ("--gt", args.gt)):
            if not folder.is_dir():
                raise ValueError(f"{label} {folder}: no such folder")
        results = evaluate_folders(args.pred, args.gt, metrics, args.crop_border, not args.rgb, args.device)
    except (ValueError, ImportError) as exc:
        logger.error("%s", exc)
        return 2
    for line in results["errors"]:
        logger.error("%s", line)
    if args.out is not None:
        write_json(results, args.out)
        logger.info("wrote %s", args.out)
    if args.csv is not None:
        write_csv(results, args.csv)
        logger.info("wrote %s", args.csv)
    means = ", ".join(f"{k}={v:.4f}" if v is not None else f"{k}=n/a" for k, v in results["mean"].items())
    logger.info("%d image pair(s) scored, %d problem(s): %s", results["count"], len(results["errors"]), means)
    return 1 if results["errors"] or not results["count"] else 0
