"""Start the web demo: a local page to upscale photos and compare before/after (needs `pip install "seesr[demo]"`).

Offers the embedded TGSR model, or the pipeline folders given with --model (SeeSR, TGSR or any pipeline folder
whose class is in the `pipelines` package or diffusers; several --model make a drop-down). Binds to 127.0.0.1
unless --host says otherwise; --share (a public gradio.live link) is off unless asked. Runs are queued, one at a
time.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from seesr.cli_options import add_device, add_dtype, add_output, number, torch_dtype

logger = logging.getLogger(__name__)

INSTALL_HINT = 'the web demo needs gradio: pip install "seesr[demo]" (or pip install -e ".[demo]" in a checkout)'


def _port(text: str) -> int:
    value = number(int, 1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        metavar="DIR",
        help="pipeline folder to offer (repeat for a drop-down); default: the embedded TGSR model",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (this machine only)")
    parser.add_argument("--port", type=_port, default=7860, help="port")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument(
        "--max-pixels",
        type=number(int, 1),
        default=4_194_304,
        help="refuse input images with more pixels (2048x2048)",
    )
    add_device(parser)
    add_dtype(parser)
    add_output(
        parser,
        "keep the session's results here (default: a temporary folder)",
        required=False,
        aliases=("--output-dir",),
    )


def build(args: argparse.Namespace):
    """(DemoApp, gradio Blocks) for the parsed arguments; raises DemoError for a bad --model."""

    from seesr.demo.page import DemoApp
    from seesr.demo.runner import DemoModel

    if args.model:
        models = [DemoModel(folder) for folder in args.model]
    else:
        from seesr.models.tgsr import default_model_path

        models = [DemoModel(default_model_path(), label="TGSR default (embedded, offline)")]
    labels: dict[str, int] = {}
    for model in models:  # the same folder name twice: number the labels
        labels[model.label] = labels.get(model.label, 0) + 1
        if labels[model.label] > 1:
            model.label = f"{model.label} #{labels[model.label]}"
    for model in models:
        model.device, model.dtype = args.device, torch_dtype(args.dtype)
    demo = DemoApp(models, max_pixels=args.max_pixels, output_dir=args.output)
    return demo, demo.build()


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        logger.error("%s", INSTALL_HINT)
        return 2
    from seesr.demo.page import launch
    from seesr.demo.runner import DemoError

    try:
        demo, app = build(args)
    except (DemoError, FileNotFoundError) as error:
        logger.error("%s", str(error).splitlines()[0])
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Binding to %s: the demo is reachable from other machines (no authentication)", args.host)
    launch(app, args.host, args.port, args.share, demo.output_dir)
    return 0
