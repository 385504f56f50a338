"""`seesr` as a tool (issue #14): one CLI language, nothing loaded for nothing, Ctrl-C, NaN, names, claims, guards,
and outputs that keep what the input had (16-bit, grey, alpha, ICC, EXIF)."""

import argparse
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import lq_image, tiny_pipeline

from seesr.cli import build_parser, main
from seesr.cli import upscale as upscale_module
from seesr.cli_options import HIDDEN_ALIASES
from seesr.image_io import claim_path, expand_inputs, load_image
from seesr.image_save import write_png16


@pytest.fixture(autouse=True)
def _reuse_loaded_pipelines(monkeypatch):
    """Each `main()` loads its model afresh; here a model folder is loaded once per test module (speed only)."""
    load = upscale_module.load_pipeline

    def cached(*args):
        if args not in _LOADED:
            _LOADED[args] = load(*args)
        return _LOADED[args]

    monkeypatch.setattr(upscale_module, "load_pipeline", cached)


_LOADED: dict = {}


def seesr(model_dir, inputs, out, *extra):
    args = ["upscale", *map(str, inputs), "-o", str(out), "--model", str(model_dir), "--steps", "1"]
    return main(args + ["--process-size", "32", "--upscale", "2", "--guidance-scale", "1", *extra])


def _png_header(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return data[24], data[25]  # bit depth, colour type


def _png16_pixels(path: Path) -> np.ndarray:
    """Decode the filter-0 16-bit PNGs `write_png16` writes (Pillow reads 16-bit colour as 8-bit)."""
    data, pos, idat = path.read_bytes(), 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if kind == b"IHDR":
            width, height, _, colour = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += length + 12
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[colour]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, -1)[:, 1:]
    return raw.copy().view(">u2").reshape(height, width, channels)


def test_version_and_python_m(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == "seesr 0.1.0"
    result = subprocess.run([sys.executable, "-m", "seesr", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "seesr 0.1.0"


def _commands():
    parser = build_parser()
    return parser, next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_shows_every_default_groups_and_hides_aliases():
    _, commands = _commands()
    for name, command in commands.items():
        text = command.format_help()
        assert not any(f"{alias} " in text or f"{alias}," in text for alias in HIDDEN_ALIASES), name
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.nargs == 0 or action.default is None:
                continue  # flags, and options without a default
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert f"default: {action.default}" in shown, (name, action.option_strings, shown)
    upscale_help = commands["upscale"].format_help()
    for group in ("input/output:", "model:", "sampling", "tiling:", "performance:"):
        assert group in upscale_help


def test_one_option_language_across_commands(tmp_path):
    parser, commands = _commands()
    for name in ("upscale", "convert", "tag", "make-pairs"):
        actions = {s: a for a in commands[name]._actions for s in a.option_strings}
        assert "-o" in actions and "--output" in actions and actions["-o"].dest == "output", name
        assert "--overwrite" in actions, name
    for name in ("upscale", "convert", "tag"):
        for given, expected in (("float16", "fp16"), ("bf16", "bf16"), ("FP32", "fp32"), ("bfloat16", "bf16")):
            argv = {"upscale": ["upscale", "x.png", "-o", "o"], "convert": ["convert", "-o", "o"],
                    "tag": ["tag", "x.png", "--model", "m"]}[name]  # fmt: skip
            assert parser.parse_args([*argv, "--dtype", given]).dtype == expected
    for name in ("upscale", "tag"):
        assert "--model" in {s for a in commands[name]._actions for s in a.option_strings}
    with pytest.raises(SystemExit):
        parser.parse_args(["upscale", "x.png", "-o", "o", "--dtype", "int8"])
    old = parser.parse_args(["upscale", "x.png", "--output-dir", "o"])  # old spellings still parse
    assert old.output == Path("o")
    assert parser.parse_args(["tag", "x.png", "--model", "m", "--out-dir", "t"]).output == Path("t")
    assert parser.parse_args(["evaluate", "--pred", "p", "--gt", "g", "--out", "r.json"]).output == Path("r.json")


def test_output_names_are_unique_across_the_batch():
    names = upscale_module.output_names([Path("x/a.jpg"), Path("a.png"), Path("a_2.png"), Path("y/A.png")], "png")
    assert names == [["a.png"], ["a_2.png"], ["a_2_2.png"], ["A_3.png"]]
    samples = upscale_module.output_names([Path("a.png"), Path("b/a.png")], "jpg", samples=2)
    assert samples == [["a-s1.jpg", "a-s2.jpg"], ["a_2-s1.jpg", "a_2-s2.jpg"]]


def test_colliding_stems_all_written(model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(("a.jpg", "a.png", "a_2.png")):
        lq_image(16, 16, seed=i).save(inputs / name)
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), "--upscale", "2"]) == 0  # the embedded TGSR model
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_2.png", "a_2_2.png"]
    pixels = [np.asarray(Image.open(out / n)) for n in ("a.png", "a_2.png", "a_2_2.png")]
    assert not np.array_equal(pixels[1], pixels[2])


def test_nothing_to_do_loads_nothing(tmp_path, caplog):
    lq_image(16, 16).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"done")
    with caplog.at_level(logging.INFO):  # a model that does not exist: loading it would fail
        assert main(["upscale", str(tmp_path / "a.png"), "-o", str(out), "--model", str(tmp_path / "none")]) == 0
    assert any("nothing to do" in r.getMessage() for r in caplog.records)


def test_seesr_options_with_tgsr_are_errors_and_seed_warns(tmp_path, caplog, monkeypatch):
    lq_image(16, 16).save(tmp_path / "a.png")
    monkeypatch.setattr(upscale_module, "load_pipeline", lambda *a: pytest.fail("must fail before loading"))
    with caplog.at_level(logging.WARNING):
        code = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--steps", "5",
                     "--guidance-scale", "3", "--seed", "1"])  # fmt: skip
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "--steps" in errors[0] and "--guidance-scale" in errors[0]
    assert any("--seed" in r.getMessage() and "deterministic" in r.getMessage() for r in caplog.records)


def test_output_size_guard_refuses_before_work(tmp_path, caplog, monkeypatch):
    lq_image(16, 16).save(tmp_path / "a.png")
    monkeypatch.setattr(upscale_module, "load_pipeline", lambda *a: pytest.fail("must refuse before loading"))
    with caplog.at_level(logging.ERROR):
        code = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--max-output-pixels", "4000"])
    assert code == 1 and not list((tmp_path / "o").iterdir())
    (line,) = [r.getMessage() for r in caplog.records if "--max-output-pixels=4000" in r.getMessage()]
    assert "a.png" in line and "4096" in line and "raise it" in line


def test_ctrl_c_leaves_nothing_and_exits_130(model_dir, tmp_path, monkeypatch, capsys):
    lq_image(16, 16).save(tmp_path / "a.png")
    save = Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    out = tmp_path / "out"
    assert seesr(model_dir, [tmp_path / "a.png"], out) == 130
    monkeypatch.setattr(Image.Image, "save", save)
    assert list(out.iterdir()) == []  # no claim, no temporary file, no partial output
    err = capsys.readouterr().err
    assert "Traceback" not in err and sum("interrupted" in line for line in err.splitlines()) == 1


def test_nan_output_is_an_error_and_nothing_is_written(tmp_path, caplog):
    pipe = tiny_pipeline(seed=0)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    model = tmp_path / "nan-model"
    pipe.save_pretrained(model)
    lq_image(16, 16).save(tmp_path / "a.png")
    with caplog.at_level(logging.ERROR):
        assert seesr(model, [tmp_path / "a.png"], tmp_path / "out") == 1
    lines = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert len(lines) == 1 and "a.png" in lines[0] and "nothing written" in lines[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_half_on_cpu_warns_and_dape_float32_is_quiet(model_dir, tmp_path, caplog, monkeypatch):
    from tiny_dape import tiny_dape

    lq_image(16, 16).save(tmp_path / "a.png")
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(upscale_module, "load_pipeline", lambda *a: (_ for _ in ()).throw(ValueError("stop here")))
        assert seesr(model_dir, [tmp_path / "a.png"], tmp_path / "out", "--dtype", "float16") == 1
    assert any("fp16 on CPU" in r.getMessage() and "slower" in r.getMessage() for r in caplog.records)

    folder = tmp_path / "with-dape"
    tiny_pipeline(seed=0, prompt_extractor=tiny_dape()).save_pretrained(folder)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.WARNING)
    diffusers_logger.addHandler(handler)
    try:
        pipe = upscale_module.load_pipeline(str(folder), "SeeSRPipeline", torch.device("cpu"), torch.bfloat16)
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers_logger.setLevel(level)
    assert pipe.prompt_extractor.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16
    assert not [r for r in records if "float32" in r.getMessage()]


def test_prompt_files_negative_added_prompt_and_samples(model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    lq_image(16, 16).save(inputs / "a.png")
    (inputs / "a.txt").write_text("a red bird\n")
    lq_image(16, 16, seed=1).save(inputs / "b.png")
    out = tmp_path / "out"
    code = seesr(model_dir, [inputs], out, "--prompt-files", "--prompt", "a cat", "--save-prompts",
                 "--added-prompt", "sharp", "--negative-prompt", "blur", "--num-samples", "2",
                 "--conditioning-scale", "0.5", "--seed-per-image")  # fmt: skip
    assert code == 0
    assert (out / "a-s1.txt").read_text() == "a red bird,sharp\n" and (out / "b-s2.txt").read_text() == "a cat,sharp\n"
    s1, s2 = (np.asarray(Image.open(out / f"a-s{k}.png")) for k in (1, 2))
    assert s1.shape == (32, 32, 3) and not np.array_equal(s1, s2)


def test_kwargs_reach_the_pipeline():
    parser = build_parser()
    args = parser.parse_args(["upscale", "x", "-o", "o", "--start-point", "noise", "--start-timestep", "500",
                              "--no-upcast-vae", "--dtype", "fp16", "--conditioning-scale", "0.3"])  # fmt: skip
    kwargs = upscale_module.pipeline_kwargs("SeeSRPipeline", args)
    assert kwargs["start_point"] == "noise" and kwargs["start_timestep"] == 500
    assert kwargs["upcast_vae"] is False and kwargs["conditioning_scale"] == 0.3
    args = parser.parse_args(["upscale", "x", "-o", "o", "--dtype", "fp16", "--scheduler", "dpm"])
    kwargs = upscale_module.pipeline_kwargs("SeeSRPipeline", args)
    # not given: the pipeline's start point for the sampler (999 for DDPM, its first step otherwise) and the folder's
    # stored step count (50, or SeeSR-Turbo's 2)
    assert kwargs["upcast_vae"] is True and "start_timestep" not in kwargs and "num_inference_steps" not in kwargs


def test_claims_are_exclusive_and_never_follow_links(tmp_path):
    target = tmp_path / "a.png"
    assert claim_path(target) and not claim_path(target)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "b.png")
    assert not claim_path(tmp_path / "b.png") and victim.read_text() == "keep me"
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old fixed probe name, planted as links
        os.symlink(victim, out / f".seesr-write-test-{pid}")
    assert upscale_module.prepare_output(out) is None and victim.read_text() == "keep me"


def test_a_name_claimed_by_another_run_is_skipped(model_dir, tmp_path, monkeypatch, caplog):
    for name in ("a", "b"):
        lq_image(16, 16).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    real = upscale_module.upscale_one

    def first_call_claims_b(*args, **kwargs):
        claim_path(out / "b.png")  # another process takes b while we work on a
        return real(*args, **kwargs)

    monkeypatch.setattr(upscale_module, "upscale_one", first_call_claims_b)
    with caplog.at_level(logging.WARNING):
        assert (
            main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out), "--upscale", "2"]) == 0
        )
    assert Image.open(out / "a.png").size == (32, 32)
    assert (out / "b.png").stat().st_size == 0  # the other run's claim, left alone
    assert any("b.png" in r.getMessage() and "claimed" in r.getMessage() for r in caplog.records)


def test_folder_scan_skips_hidden_and_temporary_files_and_says_why(tmp_path, caplog):
    lq_image(8, 8).save(tmp_path / "a.png")
    lq_image(8, 8).save(tmp_path / ".a.tmp-0123456789ab.png")
    (tmp_path / ".hidden").mkdir()
    lq_image(8, 8).save(tmp_path / ".hidden" / "b.png")
    (tmp_path / "a.txt").write_text("caption")
    with caplog.at_level(logging.INFO):
        files, errors = expand_inputs([str(tmp_path)])
    assert files == [tmp_path / "a.png"] and errors == []
    lines = [r.getMessage() for r in caplog.records]
    assert any(".a.tmp-0123456789ab.png" in line and ".hidden/b.png" in line and "hidden" in line for line in lines)
    assert any("a.txt" in line and "not an image suffix" in line for line in lines)


def _icc_and_exif():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "SeeSR camera"  # Make
    exif[0x0112] = 6  # orientation: rotate 90
    return icc, exif


def test_outputs_keep_depth_grey_alpha_icc_and_exif(tmp_path, caplog):
    """With the embedded TGSR default (x2): 16-bit PNG, grey, GIF, WebP, TIFF, BMP in; ICC + EXIF carried."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rgb = np.asarray(lq_image(12, 8))
    write_png16(rgb.astype(np.uint16) * 257 + 100, inputs / "deep.png")
    icc, exif = _icc_and_exif()
    lq_image(12, 8).save(inputs / "tagged.jpg", icc_profile=icc, exif=exif)
    lq_image(12, 8).convert("L").save(inputs / "grey.png")
    frames = [lq_image(8, 8, seed=i).convert("P") for i in range(3)]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["upscale", str(inputs), "-o", str(out), "--upscale", "2"]) == 0
    assert _png_header(out / "deep.png") == (16, 2)
    deep = _png16_pixels(out / "deep.png")
    assert deep.shape == (16, 24, 3) and (deep % 257 != 0).any()  # real 16-bit values, not 8-bit * 257
    tagged = Image.open(out / "tagged.png")
    assert tagged.info.get("icc_profile") == icc and tagged.getexif().get(0x010F) == "SeeSR camera"
    assert tagged.size == (16, 24) and 0x0112 not in tagged.getexif()  # upright pixels, orientation dropped
    assert Image.open(out / "grey.png").mode == "L"
    assert Image.open(out / "anim.png").size == (16, 16)
    assert any("anim.gif" in r.getMessage() and "first frame" in r.getMessage() for r in caplog.records)
    assert main(["upscale", str(inputs / "grey.png"), "-o", str(out), "--upscale", "2", "--no-keep-grey",
                 "--overwrite"]) == 0  # fmt: skip
    assert Image.open(out / "grey.png").mode == "RGB"


def test_alpha_kept_or_flattened_with_a_warning(tmp_path, caplog):
    rgba = lq_image(8, 8).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((8, 8)))
    rgba.save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING):
        assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--upscale", "2"]) == 0
        assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--upscale", "2",
                     "--format", "jpg"]) == 0  # fmt: skip
    kept = Image.open(tmp_path / "o" / "a.png")
    assert kept.mode == "RGBA" and np.asarray(kept)[..., 3].std() > 10
    assert Image.open(tmp_path / "o" / "a.jpg").mode == "RGB"
    assert sum("flattened onto white" in r.getMessage() for r in caplog.records) == 1


def test_loaded_image_records_what_the_file_had(tmp_path):
    for suffix in ("webp", "tif", "bmp", "gif"):
        lq_image(8, 6).save(tmp_path / f"x.{suffix}")
        assert load_image(tmp_path / f"x.{suffix}").rgb.size == (8, 6)
        assert expand_inputs([str(tmp_path / f"*.{suffix}")])[0] == [tmp_path / f"x.{suffix}"]
    write_png16(np.full((4, 5, 3), 1000, np.uint16), tmp_path / "deep.png")
    Image.fromarray(np.full((4, 5), 1000, np.uint16)).save(tmp_path / "grey16.png")
    assert load_image(tmp_path / "deep.png").bit_depth == 16 and not load_image(tmp_path / "deep.png").grey
    loaded = load_image(tmp_path / "grey16.png")
    assert loaded.bit_depth == 16 and loaded.grey
    lq_image(5, 4).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").bit_depth == 8 and not load_image(tmp_path / "rgb.png").grey


def test_make_pairs_refuses_existing_pairs_without_overwrite(tmp_path, caplog):
    lq_image(24, 24).save(tmp_path / "a.png")
    argv = ["make-pairs", str(tmp_path / "a.png"), "-o", str(tmp_path / "pairs"), "--resolution", "16",
            "--scale", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    first = (tmp_path / "pairs" / "lq" / "a.png").read_bytes()
    with caplog.at_level(logging.ERROR):
        assert main(argv + ["--seed", "5"]) == 2
    assert any("already has pairs" in r.getMessage() and "--overwrite" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "pairs" / "lq" / "a.png").read_bytes() == first
    assert main(argv + ["--seed", "5", "--overwrite"]) == 0
    assert (tmp_path / "pairs" / "lq" / "a.png").read_bytes() != first


def test_evaluate_default_crop_border_is_the_scale_and_results_are_kept(tmp_path, caplog):
    import json

    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
    lq_image(32, 32).save(tmp_path / "gt" / "a.png")
    lq_image(32, 32, seed=1).save(tmp_path / "pred" / "a.png")
    result = tmp_path / "r.json"
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(result)]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert json.loads(result.read_text())["settings"]["crop_border"] == 4
    assert any("crop border 4" in r.getMessage() for r in caplog.records)
    assert main(argv + ["--scale", "2"]) == 2  # exists: refused
    assert json.loads(result.read_text())["settings"]["crop_border"] == 4
    assert main(argv + ["--scale", "2", "--overwrite"]) == 0
    assert json.loads(result.read_text())["settings"]["crop_border"] == 2


def test_convert_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path, caplog):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    argv = ["convert", "--ram", str(tmp_path / "ram.pth"), "--tag-list", str(tmp_path / "t.txt"),
            "--tag-thresholds", str(tmp_path / "th.txt"), "-o", str(target), "--overwrite"]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    assert (target / "thesis.tex").read_text() == "years of work"
    assert any("refusing to delete it" in r.getMessage() for r in caplog.records)
    (target / "thesis.tex").unlink()
    caplog.clear()
    with caplog.at_level(logging.ERROR):  # an empty folder may be replaced: the next problem is the missing input
        assert main(argv) == 1
    assert any("RAM checkpoint not found" in r.getMessage() for r in caplog.records)


def test_staged_folder_write_keeps_the_old_folder_on_failure(tmp_path):
    from seesr.staging import write_folder

    target = tmp_path / "pipeline"
    write_folder(target, lambda folder: (folder / "model_index.json").write_text("old"))

    def half_written(folder):
        (folder / "model_index.json").write_text("new")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError):
        write_folder(target, half_written)
    assert (target / "model_index.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # no staging leftovers
    write_folder(target, lambda folder: (folder / "model_index.json").write_text("new"))
    assert (target / "model_index.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_log_lines_do_not_garble_a_progress_bar():
    import io

    from tqdm import tqdm

    from seesr.cli import TqdmLoggingHandler

    stream = io.StringIO()
    handler = TqdmLoggingHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    with tqdm(total=3, file=stream, mininterval=0, ascii=True) as bar:
        bar.update(1)
        handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "a log line", None, None))
        bar.update(1)
    (line,) = [line for line in stream.getvalue().split("\n") if "a log line" in line]
    assert line.split("\r")[-1] == "a log line"  # the bar was cleared first: the line stands alone


def test_tgsr_pipeline_accepts_a_generator():
    from seesr.tgsr import default_model_path

    from pipelines import TGSRPipeline

    pipe = TGSRPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = pipe(image, "a cat", upscale=2, output_type="pt").images
    seeded = pipe(image, "a cat", upscale=2, output_type="pt", generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(plain, seeded, rtol=0, atol=0)


def test_saved_folders_say_how_to_install_and_the_licence_is_spdx(model_dir):
    import tomllib

    loaders = [p.read_text() for p in model_dir.glob("*.py")]  # the loader file a saved pipeline folder carries
    assert len(loaders) == 1 and "pip install seesr" not in loaders[0] and "source tree" in loaders[0]
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
