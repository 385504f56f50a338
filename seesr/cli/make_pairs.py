"""Make training/evaluation pairs offline: gt/, lq/ and sr_bicubic/ PNGs with the Real-ESRGAN degradation.

The `seesr make-pairs` command over `seesr.data.pairs.make_pairs` (see there for what is written).
"""

from __future__ import annotations

import argparse
import logging

from seesr.cli_options import add_device, add_output, add_overwrite

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="HR image files, folders (recursive) or globs")
    add_output(parser, "output folder (gets gt/, lq/, sr_bicubic/)")
    add_overwrite(parser, "replace the pairs of an output folder that already has some (default: refuse)")
    parser.add_argument("--config", help="degradation YAML (default: the Real-ESRGAN x4plus values)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and the degradation")
    parser.add_argument("--resolution", type=int, default=512, help="GT crop side in pixels")
    parser.add_argument("--scale", type=int, help="downscaling factor (default: the config's, 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images degraded together")
    add_device(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from seesr.data.degradation import DegradationConfig
    from seesr.data.pairs import SUBFOLDERS, make_pairs

    existing = [name for name in SUBFOLDERS if (args.output / name).is_dir() and any((args.output / name).iterdir())]
    if existing and not args.overwrite:
        logger.error("%s: already has pairs (%s/); pass --overwrite to replace them", args.output, existing[0])
        return 2
    try:
        config = DegradationConfig.from_yaml(args.config) if args.config else DegradationConfig()
        if args.scale is not None:
            config = dataclasses.replace(config, scale=args.scale)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        result = make_pairs(
            args.inputs, args.output, config, args.seed, args.resolution, device, batch_size=args.batch_size
        )
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        logger.error("make-pairs: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 2
    for error in result.errors:
        logger.error("%s", error)
    logger.info("wrote %d pairs to %s (%d inputs skipped)", len(result.written), args.output, len(result.errors))
    return 1 if result.errors else 0
