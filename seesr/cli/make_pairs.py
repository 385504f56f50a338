"""Make training/evaluation pairs offline: gt/, lq/ and sr_bicubic/ PNGs with the Real-ESRGAN degradation.

The `seesr make-pairs` command over `seesr.data.pairs.make_pairs` (see there for what is written).
"""

from __future__ import annotations

import argparse
import logging

from seesr.data.pairs import make_pairs  # standard library only at import time

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="HR image files, folders (recursive) or globs")
    parser.add_argument("-o", "--output", required=True, help="output folder (gets gt/, lq/, sr_bicubic/)")
    parser.add_argument("--config", help="degradation YAML (default: the Real-ESRGAN x4plus values)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and the degradation (default 0)")
    parser.add_argument("--resolution", type=int, default=512, help="GT crop side in pixels (default 512)")
    parser.add_argument("--scale", type=int, help="downscaling factor; overrides the config's `scale` (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images degraded together (default 4)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda:0 (default: cuda if present)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from seesr.data.degradation import DegradationConfig

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
