"""The `seesr` command: thin wrappers over library functions.

Each sub-command lives in its own module with `add_arguments(parser)` and `run(args) -> int`: `upscale`,
`convert`, `make_pairs`, `evaluate` here, and `tag` in `dape.command`; `COMMANDS` maps the command names to them.
Those modules import only the standard library at module level, so `seesr --help` starts fast; the heavy imports
(torch, diffusers) happen inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, str] = {
    "upscale": "seesr.cli.upscale",
    "convert": "seesr.cli.convert",
    "tag": "dape.command",
    "make-pairs": "seesr.cli.make_pairs",
    "evaluate": "seesr.cli.evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seesr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
