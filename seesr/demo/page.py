"""The page of `seesr demo`: a gradio Blocks app over `seesr.demo.runner.DemoModel`s (needs the demo extra).

Left: model, image (upload, paste or an example), DAPE tags (SeeSR), text, preset and settings (only those the
chosen model takes), Run. Right: a before/after slider at full resolution (wheel to zoom, drag to pan, full
screen), the PNG download and a gallery of this session's results with their settings (click one to compare it
again). Runs and tagging share one queue slot, so the models never run twice at once; errors are shown in the
page as one line and the server keeps serving.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from seesr.demo.runner import SETTING_NAMES, DemoError, DemoModel  # noqa: E402
from seesr.image_io import ImageLoadError, load_image  # noqa: E402

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
QUEUE = "model"  # the concurrency group of everything that runs a model: one at a time


def example_rows(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """[image path, its prompt (NAME.txt, or "")] for each photo in `folder`."""
    rows = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            text = path.with_suffix(".txt")
            rows.append([str(path), text.read_text(encoding="utf-8").strip() if text.is_file() else ""])
    return rows


def pass_undecodable_files(image: gr.Image) -> gr.Image:
    """Make `image` (type filepath) hand the uploaded file's path on even when Pillow cannot open it.

    gr.Image opens the file while pre-processing and fails with a bare "Error" on a non-image; with this the path
    reaches the callback, whose loader names the file and the problem in the page. (An instance attribute, not a
    subclass: gradio writes a .pyi stub next to the module of every Component subclass.)
    """
    stock = image.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except Exception:  # Pillow raises many kinds on bad data; the callback reports it
            if payload is None or payload.path is None:
                raise
            return str(payload.path)

    image.preprocess = preprocess
    return image


class DemoApp:
    """The page's callbacks, over a list of models; `build()` returns the gradio Blocks."""

    def __init__(self, models: list[DemoModel], max_pixels: int, output_dir: str | Path | None = None):
        if not models:
            raise ValueError("models: expected at least one DemoModel")
        self.models = {model.label: model for model in models}
        self.max_pixels = max_pixels
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="seesr-demo-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.counter = 0

    # ------------------------------------------------------------------ helpers

    def model(self, label: str) -> DemoModel:
        if label not in self.models:
            raise DemoError(f"model: unknown choice {label!r}")
        return self.models[label]

    def read_image(self, path: str | None, name: str | None = None) -> Image.Image:
        """The uploaded file as RGB, or a DemoError naming the file and the problem."""
        if not path:
            raise DemoError("No image: upload, paste or pick an example image first.")
        shown = name or Path(path).name
        try:
            loaded = load_image(path, max_pixels=self.max_pixels)
        except ImageLoadError as error:
            message = str(error).replace(str(path), shown)
            limit = f"the limit of {self.max_pixels} (--max-pixels)"
            message = message.replace(f"max_pixels={self.max_pixels}", limit)
            raise DemoError(message) from None
        return loaded.rgb

    def control_updates(self, label: str) -> list:
        """gr.update()s for the settings, preset, tags, prompt and run-info of the chosen model."""
        model = self.model(label)
        settings = model.settings()
        updates = []
        for name in SETTING_NAMES:
            setting = settings.get(name)
            if setting is None:
                updates.append(gr.update(visible=False))
            elif setting.choices is not None:
                updates.append(gr.update(visible=True, value=setting.default, choices=setting.choices))
            else:
                extra = {"label": setting.label} if name == "tile_size" else {}
                updates.append(gr.update(visible=True, value=setting.default, **extra))
        presets = list(model.presets())
        updates.append(gr.update(choices=presets, value=presets[0]))
        updates.append(gr.update(visible=model.has_tags, value=""))
        updates.append(gr.update(visible=model.has_tags))
        label_text = model.prompt_label
        updates.append(gr.update(visible=label_text is not None, label=label_text or "Prompt"))
        return updates

    # ------------------------------------------------------------------ callbacks

    def on_preset(self, label: str, preset: str) -> list:
        values = self.model(label).presets().get(preset, {})
        return [gr.update(value=values[name]) if name in values else gr.update() for name in SETTING_NAMES]

    def on_tags(self, label: str, path: str | None, progress=gr.Progress()) -> tuple:
        """DAPE's tags for the image (shown for editing); remembers which image they belong to."""
        model = self.model(label)
        if not model.has_tags or not path:
            return gr.update(), None, gr.update()
        try:
            progress(0, desc="DAPE tags")
            tags = model.tags(self.read_image(path))
        except DemoError as error:
            return gr.update(), None, self.error_text(error)
        except Exception as error:  # a failed model load or run: say so, keep serving
            logger.exception("tagging failed")
            return gr.update(), None, self.error_text(f"Tagging failed: {_one_line(error)}")
        return tags, path, "Tags ready: edit them if you like, then Run."

    def on_run(self, label: str, path: str | None, tags: str, tags_for: str | None, prompt: str, history: list,
               *values: Any, progress=gr.Progress()) -> tuple:  # fmt: skip
        """Upscale; outputs: slider, download, gallery, history, status (errors leave the results as they were)."""
        try:
            model = self.model(label)
            image = self.read_image(path)
            settings = model.check_values(dict(zip(SETTING_NAMES, values, strict=True)))
            self.check_output_size(model, image, settings)

            def report(done: int, total: int) -> None:
                progress((done, total or None), desc="Upscaling", unit="steps")

            progress(0, desc=f"Loading {model.label}" if model._pipe is None else "Starting")
            result = model.run(image, settings, prompt or "", tags if tags_for == path else None, report)
        except DemoError as error:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), self.error_text(error)
        except Exception as error:  # a failed run (out of memory, bad weights, ...): say so, keep serving
            logger.exception("run failed")
            message = f"The run failed: {_one_line(error)}"
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), self.error_text(message)
        after, before = self.save_result(result, path)
        entry = {"after": after, "before": before, "caption": f"{Path(after).name}: {result.caption()}"}
        history = [*history, entry]
        status = f"Done: {result.image.width}x{result.image.height} from {image.width}x{image.height}."
        if result.prompt:
            status += f" Prompt: `{result.prompt}`"
        return (before, after), after, self.gallery(history), history, status

    def check_output_size(self, model: DemoModel, image: Image.Image, settings: dict) -> None:
        """Refuse a run whose output would exceed the pixel limit times the upscale factor squared."""
        scale = float(settings.get("upscale", 1))
        pixels = image.width * image.height * scale * scale
        if pixels > self.max_pixels * 16:
            raise DemoError(
                f"The output would be {int(image.width * scale)}x{int(image.height * scale)} pixels, more than "
                f"16 x the limit of {self.max_pixels} (--max-pixels): pick a smaller factor or a smaller image."
            )

    def save_result(self, result, path: str) -> tuple[str, str]:
        """Write the output and the resized input ("before", bicubic) as PNGs; returns (after, before) paths."""
        self.counter += 1
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:60] or "image"
        scale = result.image.width / max(result.input.width, 1)
        after = self.output_dir / f"{stem}_x{scale:g}_{self.counter}.png"
        before = self.output_dir / f"{stem}_x{scale:g}_{self.counter}_before.png"
        result.image.save(after, format="PNG")
        result.input.resize(result.image.size, Image.Resampling.BICUBIC).save(before, format="PNG")
        return str(after), str(before)

    @staticmethod
    def gallery(history: list) -> list:
        return [(entry["after"], entry["caption"]) for entry in reversed(history)]

    def on_select(self, history: list, event: gr.SelectData) -> tuple:
        entry = list(reversed(history))[event.index]
        return (entry["before"], entry["after"]), entry["after"], f"Showing {entry['caption']}"

    @staticmethod
    def error_text(error: Exception | str) -> str:
        message = _one_line(error)
        gr.Warning(message)
        return f"**Error:** {message}"

    # ------------------------------------------------------------------ the page

    def build(self) -> gr.Blocks:
        first = next(iter(self.models.values()))
        with gr.Blocks(title="seesr demo", analytics_enabled=False) as app:
            gr.Markdown(
                "## seesr: semantics-aware super-resolution\nUpload or paste a photo, pick a model and "
                "settings, Run, then drag the slider to compare (wheel: zoom, drag: pan)."
            )
            history = gr.State([])
            tags_for = gr.State(None)
            with gr.Row():
                with gr.Column(scale=2):
                    model = gr.Dropdown(list(self.models), value=first.label, label="Model", elem_id="model")
                    image = gr.Image(
                        label="Input image",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        elem_id="input-image",
                        height=260,
                    )
                    pass_undecodable_files(image)
                    tags = gr.Textbox(label="DAPE tags (editable)", elem_id="tags", visible=first.has_tags)
                    tag_button = gr.Button("Get tags", size="sm", visible=first.has_tags)
                    prompt = gr.Textbox(
                        label=first.prompt_label or "Prompt",
                        elem_id="prompt",
                        visible=first.prompt_label is not None,
                        lines=2,
                    )
                    rows = example_rows()
                    if rows:
                        gr.Examples(rows, [image, prompt], label="Examples (photos in examples/)")
                    preset = gr.Dropdown(label="Preset", elem_id="preset")
                    with gr.Accordion("Settings", open=True):
                        controls = self._controls(first)
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    status = gr.Markdown("", elem_id="status")
                with gr.Column(scale=3):
                    slider = gr.ImageSlider(
                        label="Before (bicubic) / after", format="png", elem_id="result", max_height=720,
                        buttons=["download", "fullscreen"],
                    )  # fmt: skip
                    download = gr.DownloadButton("Download PNG", elem_id="download")
            gallery = gr.Gallery(
                label="This session's results (click one to compare it again)",
                columns=6,
                height=260,
                allow_preview=False,  # a click shows the result in the slider instead
                fit_columns=False,
                object_fit="contain",
                elem_id="gallery",
                format="png",
            )
            setting_controls = [controls[name] for name in SETTING_NAMES]
            model_outputs = [*setting_controls, preset, tags, tag_button, prompt]
            tagging = (self.on_tags, [model, image], [tags, tags_for, status])
            tag_event = {"concurrency_limit": 1, "concurrency_id": QUEUE}
            # a new model or a new image (upload, paste, example): DAPE's tags, shown before the run
            model.change(self.control_updates, model, model_outputs).then(*tagging, **tag_event)
            app.load(self.control_updates, model, model_outputs)
            preset.change(self.on_preset, [model, preset], setting_controls)
            image.change(*tagging, **tag_event)
            tag_button.click(*tagging, **tag_event)
            run.click(
                self.on_run,
                [model, image, tags, tags_for, prompt, history, *setting_controls],
                [slider, download, gallery, history, status],
                concurrency_limit=1,
                concurrency_id=QUEUE,
            )
            gallery.select(self.on_select, history, [slider, download, status])
        return app

    @staticmethod
    def _controls(model: DemoModel) -> dict[str, Any]:
        """One component per known setting (hidden when the model lacks it; `control_updates` fills them in)."""
        settings = model.settings()
        controls = {}
        for name in SETTING_NAMES:
            setting = settings.get(name)
            visible = setting is not None
            kwargs = {"elem_id": f"setting-{name}", "visible": visible}
            if name == "upscale":
                controls[name] = gr.Dropdown(
                    [2, 4, 8, 16], value=4, label="Upscale factor", allow_custom_value=True, **kwargs
                )
            elif name == "steps":
                controls[name] = gr.Slider(1, 100, value=50, step=1, label="Steps", **kwargs)
            elif name == "guidance":
                controls[name] = gr.Slider(0, 15, value=5.5, step=0.1, label="Guidance scale (CFG)", **kwargs)
            elif name == "seed":
                controls[name] = gr.Number(42, label="Seed", precision=0, minimum=0, **kwargs)
            elif name == "color_fix":
                controls[name] = gr.Dropdown(["adain", "wavelet", "none"], value="adain", label="Colour fix", **kwargs)
            elif name == "sampler":
                controls[name] = gr.Dropdown(["ddpm"], value="ddpm", label="Sampler", **kwargs)
            elif name == "process_size":
                info = "inputs with a side under this / the factor are enlarged first (SeeSR's small-input rule)"
                controls[name] = gr.Number(512, label="Process size", precision=0, minimum=8, info=info, **kwargs)
            elif name == "tiling":
                controls[name] = gr.Checkbox(True, label="Tiling (large images in overlapping tiles)", **kwargs)
            elif name == "tile_size":
                controls[name] = gr.Number(64, label="Tile size", precision=0, minimum=16, **kwargs)
        return controls


def _one_line(error: Exception | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def launch(app: gr.Blocks, host: str, port: int, share: bool, output_dir: Path, **kwargs):
    """Start the server (one queue slot for model runs; up to 32 waiting requests)."""
    app.queue(max_size=32)
    return app.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(output_dir)],
        max_file_size="100mb",
        footer_links=["gradio"],
        **kwargs,
    )
