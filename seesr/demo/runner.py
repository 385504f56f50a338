"""The model side of `seesr demo`, free of gradio: pipeline folders, their settings and presets, runs.

A `DemoModel` wraps one pipeline folder. Its pipeline class comes from `model_index.json`'s `_class_name`
(looked up in the `pipelines` package, then in diffusers, so new pipeline folders work without changes here), and
the settings the page shows are the ones that class's `__call__` accepts: `upscale`, `num_inference_steps`,
`guidance_scale`, `generator` (seed), `color_fix`, `latent_tile_size` / `tile_size` (tiling), `prompt`, plus a
sampler choice for SeeSR-style pipelines and editable DAPE tags when the folder has a `prompt_extractor`.
Weights load on first use; runs of one model are serialised by a lock.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Every setting the page knows, in page order. A model shows the subset its pipeline accepts.
SETTING_NAMES = ("upscale", "steps", "guidance", "seed", "color_fix", "sampler", "process_size", "tiling", "tile_size")

#: Samplers offered for pipelines with a `start_timestep` argument (SeeSR); names as in `seesr upscale`.
SAMPLERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}

#: Presets per pipeline class (a folder may add its own in `presets.json`: {"name": {setting: value}}).
BUILTIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "SeeSRPipeline": {
        "SeeSR paper (50 DDPM steps, CFG 5.5)": {
            "steps": 50,
            "guidance": 5.5,
            "sampler": "ddpm",
            "color_fix": "adain",
        },
        "Fast (20 DPM-Solver steps)": {"steps": 20, "guidance": 5.5, "sampler": "dpm", "color_fix": "adain"},
        "Faithful (no CFG, wavelet colour fix)": {
            "steps": 50,
            "guidance": 1.0,
            "sampler": "ddpm",
            "color_fix": "wavelet",
        },
    },
    "TGSRPipeline": {
        "x4 (default)": {"upscale": 4},
        "x2 (faithful)": {"upscale": 2},
        "x8 (details from the text)": {"upscale": 8},
    },
}


class DemoError(ValueError):
    """A problem to show in the page as one line (bad input, bad model folder, failed run)."""


@dataclass
class Setting:
    """One control of the page: `kind` is slider, number, dropdown, checkbox or text."""

    name: str
    label: str
    kind: str
    default: Any
    choices: list | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    info: str = ""


@dataclass
class RunResult:
    """A finished run: the output image, the input it came from (RGB), and what produced it."""

    image: Any
    input: Any
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)

    def caption(self) -> str:
        shown = {True: "on", False: "off"}
        parts = [
            f"{key} {shown.get(value, value) if isinstance(value, bool) else value}"
            for key, value in self.settings.items()
        ]
        return f"{self.image.width}x{self.image.height}, " + ", ".join(parts)


def read_class_name(folder: Path) -> str:
    """The pipeline class named by `folder/model_index.json` (`"Name"` or `["loader file", "Name"]`)."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoError(f"--model {folder}: no model_index.json (not a pipeline folder)") from None
    except (OSError, ValueError) as error:
        raise DemoError(f"--model {folder}: cannot read model_index.json ({error})") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    name = name[-1] if isinstance(name, list) and name else name
    if not isinstance(name, str):
        raise DemoError(f"--model {folder}: model_index.json has no _class_name")
    return name


def resolve_pipeline_class(name: str) -> type:
    """A pipeline class by name: this toolkit's `pipelines` package first, then diffusers."""
    import diffusers

    import pipelines

    for namespace in (pipelines, diffusers):
        try:
            cls = getattr(namespace, name)
        except (AttributeError, ImportError):
            continue
        if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline):
            return cls
    raise DemoError(f"pipeline class {name!r} is neither in the seesr `pipelines` package nor in diffusers")


def _folder_upscale_factors(folder: Path) -> list[int] | None:
    """`upscale_factors` from a component's config.json (TGSR models list the factors they were trained for)."""
    for config_path in sorted(folder.glob("*/config.json")):
        try:
            factors = json.loads(config_path.read_text(encoding="utf-8")).get("upscale_factors")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(factors, list) and factors and all(isinstance(f, int) for f in factors):
            return factors
    return None


class DemoModel:
    """One pipeline folder offered in the page."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.class_name = read_class_name(self.folder)
        self.label = label or f"{self.folder.name} ({self.class_name})"
        self.pipeline_class = resolve_pipeline_class(self.class_name)
        self.parameters = inspect.signature(self.pipeline_class.__call__).parameters
        self.has_tags = self._has_component("prompt_extractor")
        self.upscale_factors = _folder_upscale_factors(self.folder) if "upscale" in self.parameters else None
        self.device, self.dtype = None, None
        self._pipe = None
        self._lock = threading.RLock()

    def _has_component(self, name: str) -> bool:
        index = json.loads((self.folder / "model_index.json").read_text(encoding="utf-8"))
        entry = index.get(name)
        return isinstance(entry, list) and entry[0] is not None

    def _default(self, parameter: str, fallback: Any = None) -> Any:
        default = self.parameters[parameter].default
        return fallback if default is inspect.Parameter.empty or default is None else default

    # ------------------------------------------------------------------ what the page shows

    def settings(self) -> dict[str, Setting]:
        """The controls that apply to this model, by setting name, with the pipeline's own defaults."""
        params, found = self.parameters, {}
        if "upscale" in params:
            default = self._default("upscale", 4)
            if self.upscale_factors:
                default = default if default in self.upscale_factors else self.upscale_factors[0]
                found["upscale"] = Setting("upscale", "Upscale factor", "dropdown", default, self.upscale_factors)
            else:  # any factor >= 1: common ones offered, others typed in
                found["upscale"] = Setting("upscale", "Upscale factor", "dropdown", default, [2, 3, 4, 6, 8], 1)
        if "num_inference_steps" in params:
            steps = self._default("num_inference_steps", 50)
            found["steps"] = Setting("steps", "Steps", "slider", steps, None, 1, 100, 1)
        if "guidance_scale" in params:
            guidance = self._default("guidance_scale", 5.5)
            found["guidance"] = Setting(
                "guidance", "Guidance scale (CFG)", "slider", guidance, None, 0, 15, 0.1, "1 or less: no CFG"
            )
        if "generator" in params and self.class_name != "TGSRPipeline":  # TGSR takes a generator but draws nothing
            found["seed"] = Setting("seed", "Seed", "number", 42, None, 0, 2**31 - 1, 1)
        if "color_fix" in params:
            default = self._default("color_fix", "none")
            found["color_fix"] = Setting("color_fix", "Colour fix", "dropdown", default, ["adain", "wavelet", "none"])
        if "start_timestep" in params and "num_inference_steps" in params:
            found["sampler"] = Setting("sampler", "Sampler", "dropdown", "ddpm", list(SAMPLERS))
        if "process_size" in params:
            size = self._default("process_size", 512)
            info = "inputs with a side under process size / factor are enlarged first (SeeSR's rule)"
            found["process_size"] = Setting("process_size", "Process size", "number", size, None, 8, 4096, 8, info)
        tile = self._tile_parameter()
        if tile is not None:
            unit = "latent px" if tile == "latent_tile_size" else "input px"
            size = self._default(tile, 64 if tile == "latent_tile_size" else 256)
            found["tiling"] = Setting("tiling", "Tiling (large images in overlapping tiles)", "checkbox", True)
            found["tile_size"] = Setting("tile_size", f"Tile size ({unit})", "number", size, None, 16, 4096, 8)
        return found

    def _tile_parameter(self) -> str | None:
        for name in ("latent_tile_size", "tile_size"):
            if name in self.parameters:
                return name
        return None

    @property
    def prompt_label(self) -> str | None:
        """The text box's label, or None when the pipeline takes no prompt."""
        if "prompt" not in self.parameters:
            return None
        if self.has_tags:
            return "Prompt (added after the tags)"
        return "Text guide: describe the details to restore" if self.class_name == "TGSRPipeline" else "Prompt"

    def presets(self) -> dict[str, dict[str, Any]]:
        """Named settings: "Model defaults", the class's built-in presets, then the folder's presets.json."""
        settings = self.settings()
        presets = {"Model defaults": {name: s.default for name, s in settings.items()}}
        presets.update(BUILTIN_PRESETS.get(self.class_name, {}))
        path = self.folder / "presets.json"
        if path.is_file():
            try:
                extra = json.loads(path.read_text(encoding="utf-8"))
                presets.update({str(k): dict(v) for k, v in extra.items()})
            except (OSError, ValueError, TypeError, AttributeError) as error:
                logger.warning("%s: ignored (%s)", path, error)
        # keep only the settings this model has, and factors it supports
        cleaned = {}
        for name, values in presets.items():
            values = {k: v for k, v in values.items() if k in settings}
            if self.upscale_factors and values.get("upscale", self.upscale_factors[0]) not in self.upscale_factors:
                continue
            cleaned[name] = values
        return cleaned

    # ------------------------------------------------------------------ loading and running

    def load(self):
        """The pipeline (loaded once, on first use)."""
        import torch

        with self._lock:
            if self._pipe is None:
                device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
                dtype = self.dtype or torch.float32
                logger.info("Loading %s (%s) on %s", self.folder, self.class_name, device)
                pipe = self.pipeline_class.from_pretrained(str(self.folder), dtype=dtype)
                pipe.to(device)
                if getattr(pipe, "prompt_extractor", None) is not None:
                    pipe.prompt_extractor.to(dtype=torch.float32)  # DAPE runs in fp32, as the original
                pipe.set_progress_bar_config(disable=True)
                self._pipe = pipe
            return self._pipe

    def tags(self, image) -> str:
        """DAPE's tags for `image` (PIL RGB), as the pipeline would put them before the prompt."""
        import torch

        from seesr.conditioning import dape_condition

        if not self.has_tags:
            return ""
        with self._lock, torch.no_grad():
            pipe = self.load()
            tags, _ = dape_condition(pipe.prompt_extractor, [image])
        return tags[0]

    def run(
        self,
        image,
        values: dict[str, Any],
        prompt: str = "",
        tags: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> RunResult:
        """Upscale `image` (PIL RGB) with the settings `values` (names of `settings()`).

        With DAPE, `tags` replaces the tags DAPE would give (None: DAPE's own); DAPE's representation tokens are
        used either way, so unchanged tags give exactly the pipeline's own result.
        """
        import torch

        values = self.check_values(values)
        with self._lock:
            pipe = self.load()
            kwargs = self._call_kwargs(values)
            call_pipe, used_prompt = pipe, prompt
            if self.has_tags and tags is not None:
                with torch.no_grad():
                    _, embeds = _dape_embeds(pipe, image)
                kwargs["image_embeds"] = embeds
                call_pipe = _without_prompt_extractor(pipe)
                used_prompt = f"{tags.strip()}, {prompt}" if tags.strip() else prompt
            if "prompt" in self.parameters:
                kwargs["prompt"] = used_prompt
            scheduler = pipe.scheduler if "sampler" in values else None
            if scheduler is not None:
                call_pipe.scheduler = _scheduler(pipe, values["sampler"])
                if values["sampler"] != "ddpm":
                    kwargs["start_timestep"] = None  # noise the LR latent to the sampler's own first step
            call_pipe.progress_bar = _progress_factory(progress)
            try:
                out = call_pipe(image=image, output_type="pil", **kwargs)  # by name: diffusers orders differ
            finally:
                call_pipe.__dict__.pop("progress_bar", None)
                if scheduler is not None:
                    call_pipe.scheduler = scheduler
        prompts = getattr(out, "prompts", None)
        return RunResult(out.images[0], image, prompts[0] if prompts else used_prompt, values)

    def check_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` for every setting (defaults filled in), numbers checked; DemoError names a bad one."""
        checked = {}
        for name, setting in self.settings().items():
            value = values.get(name, setting.default)
            if setting.kind in ("slider", "number") or name == "upscale":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise DemoError(f"{setting.label}: expected a number, got {value!r}") from None
                value = int(value) if value.is_integer() else value
                if setting.minimum is not None and value < setting.minimum:
                    raise DemoError(f"{setting.label}: expected at least {setting.minimum:g}, got {value:g}")
                if name == "upscale" and self.upscale_factors and value not in self.upscale_factors:
                    factors = ", ".join(map(str, self.upscale_factors))
                    raise DemoError(f"{setting.label}: this model supports {factors}, got {value:g}")
            checked[name] = value
        return checked

    def _call_kwargs(self, values: dict[str, Any]) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {}
        if "upscale" in values:
            upscale = float(values["upscale"])
            kwargs["upscale"] = int(upscale) if self.upscale_factors or upscale.is_integer() else upscale
        if "steps" in values:
            kwargs["num_inference_steps"] = int(values["steps"])
        if "guidance" in values:
            kwargs["guidance_scale"] = float(values["guidance"])
        if "seed" in values:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(values["seed"]))
        if "process_size" in values:
            kwargs["process_size"] = int(values["process_size"])
        if "color_fix" in values:
            kwargs["color_fix"] = None if values["color_fix"] == "none" else values["color_fix"]
        tile = self._tile_parameter()
        if tile is not None:
            size = int(values["tile_size"])
            if tile == "latent_tile_size":
                kwargs[tile] = size if values["tiling"] else None
            else:  # TGSR-style: tiles in input pixels, one tile covering everything turns tiling off
                kwargs[tile] = size if values["tiling"] else 1 << 30
            overlap = tile.replace("size", "overlap")
            if overlap in self.parameters:  # the default overlap, but at most a quarter of a (small) tile
                kwargs[overlap] = min(int(self._default(overlap, 0)), size // 4)
        return kwargs


def _dape_embeds(pipe, image):
    from seesr.conditioning import dape_condition

    return dape_condition(pipe.prompt_extractor, [image], with_tags=False)


def _without_prompt_extractor(pipe):
    """The same pipeline (shared modules, nothing copied) without its prompt extractor, cached on `pipe`."""
    view = pipe.__dict__.get("_demo_view")
    if view is None:
        components = {**pipe.components, "prompt_extractor": None}
        view = type(pipe)(**components)
        view.set_progress_bar_config(disable=True)
        pipe.__dict__["_demo_view"] = view
    return view


def _scheduler(pipe, sampler: str):
    import diffusers

    return getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)


class _Progress:
    """Stands in for diffusers' tqdm progress bar and reports (done, total) to a callback."""

    def __init__(self, total: int | None, callback: Callable[[int, int], None] | None):
        self.total, self.done, self.callback = total or 0, 0, callback

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


def _progress_factory(callback: Callable[[int, int], None] | None):
    def progress_bar(iterable=None, total=None):
        if iterable is not None:
            total = len(iterable) if hasattr(iterable, "__len__") else total
            bar = _Progress(total, callback)

            def generate():
                for item in iterable:
                    yield item
                    bar.update()

            return generate()
        return _Progress(total, callback)

    return progress_bar
