"""`seesr demo`, the model side (no browser): settings per pipeline, presets, runs equal the pipelines' own
results, DAPE tags edited before a run, bad folders, and the command without gradio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from demo_tiny import photo, save_tiny_seesr, save_tiny_tgsr
from PIL import Image

from pipelines import SeeSRPipeline, TGSRPipeline
from seesr.cli import main
from seesr.demo.runner import DemoError, DemoModel

QUICK = {"Quick": {"steps": 2, "process_size": 32, "guidance": 3.0}}


@pytest.fixture(scope="module")
def tgsr_dir(tmp_path_factory):
    return save_tiny_tgsr(tmp_path_factory.mktemp("demo") / "tgsr")


@pytest.fixture(scope="module")
def seesr_dir(tmp_path_factory):
    return save_tiny_seesr(tmp_path_factory.mktemp("demo") / "seesr", presets=QUICK)


def test_settings_are_those_the_pipeline_takes(tgsr_dir, seesr_dir):
    tgsr = DemoModel(tgsr_dir)
    assert tgsr.class_name == "TGSRPipeline" and not tgsr.has_tags
    settings = tgsr.settings()
    assert list(settings) == ["upscale", "tiling", "tile_size"]
    assert settings["upscale"].choices == [2, 4, 8] and settings["upscale"].default == 4
    assert settings["tile_size"].default == 256
    assert tgsr.prompt_label.startswith("Text guide")

    seesr = DemoModel(seesr_dir)
    assert seesr.class_name == "SeeSRPipeline" and seesr.has_tags
    settings = seesr.settings()
    assert list(settings) == [
        "upscale", "steps", "guidance", "seed", "color_fix", "sampler", "process_size", "tiling", "tile_size"
    ]  # fmt: skip
    defaults = (settings["steps"].default, settings["guidance"].default, settings["color_fix"].default)
    assert defaults == (50, 5.5, "adain")
    assert settings["tile_size"].default == 64 and "latent" in settings["tile_size"].label
    assert seesr.prompt_label.startswith("Prompt (added after the tags)")


def test_presets_merge_the_folder_file_and_drop_what_does_not_apply(tgsr_dir, seesr_dir, tmp_path):
    presets = DemoModel(seesr_dir).presets()
    assert list(presets)[0] == "Model defaults" and presets["Quick"] == QUICK["Quick"]
    assert presets["Fast (20 DPM-Solver steps)"]["sampler"] == "dpm"
    tgsr = DemoModel(tgsr_dir).presets()
    assert "x8 (details from the text)" in tgsr
    # a folder whose model has no x8 loses that preset; settings the model lacks are dropped
    folder = tmp_path / "tgsr24"
    for item in tgsr_dir.iterdir():
        (folder / item.name).parent.mkdir(parents=True, exist_ok=True)
        if item.is_dir():
            (folder / item.name).mkdir()
            for f in item.iterdir():
                (folder / item.name / f.name).write_bytes(f.read_bytes())
        else:
            (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "model" / "config.json").read_text())
    (folder / "model" / "config.json").write_text(json.dumps({**config, "upscale_factors": [2, 4]}))
    (folder / "presets.json").write_text(json.dumps({"Sharp": {"upscale": 2, "steps": 9}}))
    presets = DemoModel(folder).presets()
    assert "x8 (details from the text)" not in presets and presets["Sharp"] == {"upscale": 2}


def test_tgsr_run_equals_the_pipeline_and_reports_progress(tgsr_dir):
    model = DemoModel(tgsr_dir)
    image, calls = photo(40, 24), []
    values = {"upscale": 2, "tiling": True, "tile_size": 16}
    result = model.run(image, values, "a red bird", progress=lambda done, total: calls.append((done, total)))
    pipe = TGSRPipeline.from_pretrained(tgsr_dir)
    expected = pipe(image, "a red bird", upscale=2, tile_size=16, tile_overlap=4).images[0]  # overlap <= tile / 4
    assert result.image.size == (80, 48)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected))
    assert calls == [(i, 6) for i in range(1, 7)]  # 3 x 2 tiles
    untiled = model.run(image, {"upscale": 2, "tiling": False, "tile_size": 16}, "a red bird")
    np.testing.assert_array_equal(
        np.asarray(untiled.image), np.asarray(pipe(image, "a red bird", upscale=2, tile_size=1 << 30).images[0])
    )


def test_seesr_run_with_dape_tags_unchanged_equals_the_pipeline(seesr_dir):
    model = DemoModel(seesr_dir)
    image = photo(16, 16, seed=1)
    values = {"upscale": 2, "steps": 1, "guidance": 3.0, "seed": 7, "process_size": 32}
    tags = model.tags(image)
    assert tags  # the tiny DAPE does tag
    result = model.run(image, values, "a photo", tags=tags)
    pipe = SeeSRPipeline.from_pretrained(seesr_dir)
    expected = pipe(image, "a photo", upscale=2, num_inference_steps=1, guidance_scale=3.0, process_size=32,
                    generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert result.prompt == expected.prompts[0] and result.image.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected.images[0]))
    own = model.run(image, values, "a photo")  # tags=None: DAPE's own, inside the pipeline
    np.testing.assert_array_equal(np.asarray(own.image), np.asarray(expected.images[0]))

    edited = model.run(image, values, "a photo", tags="a red bird")
    assert edited.prompt.startswith("a red bird, a photo,")
    assert not np.array_equal(np.asarray(edited.image), np.asarray(expected.images[0]))
    dpm = model.run(image, {**values, "sampler": "dpm"}, "a photo")
    assert not np.array_equal(np.asarray(dpm.image), np.asarray(expected.images[0]))
    assert type(model.load().scheduler).__name__ == "DDPMScheduler"  # the sampler is put back


@pytest.mark.parametrize(
    "values, match",
    [
        ({"upscale": 3}, "Upscale factor: this model supports 2, 4, 8, got 3"),
        ({"upscale": "x4"}, "Upscale factor: expected a number, got 'x4'"),
        ({"tile_size": None}, r"Tile size \(input px\): expected a number, got None"),
        ({"tile_size": 4}, r"Tile size \(input px\): expected at least 16, got 4"),
    ],
)
def test_bad_settings_give_one_line_errors_before_running(tgsr_dir, values, match):
    model = DemoModel(tgsr_dir)
    with pytest.raises(DemoError, match=match):
        model.run(photo(8, 8), values)
    assert model._pipe is None  # refused before loading anything


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "no model_index.json"),
        (lambda d: (d / "model_index.json").write_text("{"), "cannot read model_index.json"),
        (lambda d: (d / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}'), "NoSuchPipeline"),
    ],
)
def test_bad_model_folders_give_one_line_errors(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(DemoError, match=match):
        DemoModel(tmp_path)


def test_the_command_without_gradio_says_how_to_install_it(monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["demo"]) == 2
    assert 'pip install "seesr[demo]"' in caplog.text


def test_the_command_rejects_a_bad_model_folder(tmp_path, caplog):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    assert main(["demo", "--model", str(tmp_path)]) == 1
    assert "no model_index.json" in caplog.text


def test_runs_of_one_model_never_overlap(tgsr_dir):
    """Two threads (two browser tabs) running one model: the second run starts after the first ends."""
    import threading

    model, events = DemoModel(tgsr_dir), []

    def work(name: str) -> None:
        values = {"upscale": 2, "tiling": True, "tile_size": 16}
        model.run(photo(40, 24), values, "a cat", progress=lambda done, total: events.append(name))

    threads = [threading.Thread(target=work, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(events) == 12 and events in (["a"] * 6 + ["b"] * 6, ["b"] * 6 + ["a"] * 6)


def test_page_queues_model_work_in_one_slot_and_binds_localhost(tgsr_dir):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from seesr.cli import build_parser
    from seesr.demo.page import DemoApp

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    app = DemoApp([DemoModel(tgsr_dir)], max_pixels=1000).build()
    model_work = [fn for fn in app.fns.values() if getattr(fn.fn, "__name__", "") in ("on_run", "on_tags")]
    assert len(model_work) == 4  # run, image change, model change (then), tag button
    assert {(fn.concurrency_limit, fn.concurrency_id) for fn in model_work} == {(1, "model")}


def test_a_failed_run_gives_a_message_and_the_next_run_works(tgsr_dir, tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from seesr.demo.page import DemoApp
    from seesr.demo.runner import SETTING_NAMES

    model = DemoModel(tgsr_dir)
    app = DemoApp([model], max_pixels=1000, output_dir=tmp_path / "out")
    photo(20, 12).save(tmp_path / "in.png")
    values = [{"upscale": 2, "tiling": True, "tile_size": 256}.get(name) for name in SETTING_NAMES]
    args = (model.label, str(tmp_path / "in.png"), "", None, "a cat", [], *values)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    with monkeypatch.context() as patch, pytest.warns(UserWarning, match="CUDA out of memory"):  # the page's toast
        patch.setattr(model, "run", out_of_memory)
        outputs = app.on_run(*args, progress=lambda *a, **k: None)
    assert outputs[-1] == "**Error:** The run failed: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert not list((tmp_path / "out").iterdir())  # nothing written
    slider, download, gallery, history, status = app.on_run(*args, progress=lambda *a, **k: None)
    assert status.startswith("Done: 40x24 from 20x12") and len(history) == 1
    assert Image.open(download).size == (40, 24) and Image.open(slider[0]).size == (40, 24)
