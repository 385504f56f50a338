"""`seesr convert`: released SD2 + SeeSR folders -> one SeeSRPipeline folder."""

import json
import logging

import numpy as np
import pytest
import torch
from tiny import lq_image, write_released_folder, write_sd2_folder

from pipelines import SeeSRPipeline
from seesr.cli import main


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    write_sd2_folder(root / "sd2")
    unet_state = write_released_folder(root / "seesr" / "unet", "unet")
    controlnet_state = write_released_folder(root / "seesr" / "controlnet", "controlnet")
    return root, unet_state, controlnet_state


def convert_args(root, out, *extra: str) -> list[str]:
    """``seesr convert`` of the released tiny SeeSR folder onto the tiny SD2 folder in ``root``, into ``out``."""
    return ["convert", "--sd", str(root / "sd2"), "--seesr", str(root / "seesr"), "-o", str(out), *extra]


def upscale_args(tmp_path, model, *extra: str) -> list[str]:
    """``seesr upscale`` of ``tmp_path/lq.png`` into ``tmp_path/sr`` with the converted folder ``model``."""
    return ["upscale", str(tmp_path / "lq.png"), "-o", str(tmp_path / "sr"), "--model", str(model), *extra]


def test_convert_builds_a_loadable_pipeline(released, tmp_path):
    root, unet_state, controlnet_state = released
    out = tmp_path / "pipe"
    assert main(["convert", "--sd", str(root / "sd2"), "--seesr", str(root / "seesr"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "controlnet",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    pipe = SeeSRPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.steps_offset == 1
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in unet_state.items())
    assert all(torch.equal(pipe.controlnet.state_dict()[k], v) for k, v in controlnet_state.items())
    image = pipe(
        lq_image(16, 16),
        num_inference_steps=1,
        process_size=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # An existing output is never clobbered without --overwrite.
    assert main(convert_args(root, out)) == 1
    assert main(convert_args(root, out, "--overwrite", "--dtype", "fp16")) == 0
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "SeeSRUNet2DConditionModel"


def test_missing_and_mismatched_files_are_clear_errors(released, tmp_path, caplog):
    root, _, _ = released
    cases = {
        "missing seesr": (["--seesr", str(tmp_path / "nope")], "the SeeSR unet config not found"),
        "missing sd": (["--sd", str(tmp_path / "sd-missing")], "Stable Diffusion folder not found"),
    }
    for name, (override, message) in cases.items():
        args = {"--sd": str(root / "sd2"), "--seesr": str(root / "seesr")}
        args.update(dict(zip(override[::2], override[1::2])))
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = main(["convert", *sum(args.items(), ()), "-o", str(tmp_path / name)])
        assert code == 1 and message in caplog.text, name
        assert not (tmp_path / name).exists()

    bad = tmp_path / "seesr-bad"
    write_released_folder(bad / "unet", "unet", drop="mid_block.image_attentions.0.proj_in.weight")
    write_released_folder(bad / "controlnet", "controlnet")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(["convert", "--sd", str(root / "sd2"), "--seesr", str(bad), "-o", str(tmp_path / "bad-out")])
    assert code == 1 and "mid_block.image_attentions.0.proj_in.weight" in caplog.text
    assert not (tmp_path / "bad-out").exists()

    stock = tmp_path / "seesr-stock"
    write_released_folder(stock / "unet", "unet")
    write_released_folder(stock / "controlnet", "controlnet")
    config = json.loads((stock / "unet" / "config.json").read_text())
    config.pop("use_image_cross_attention")
    (stock / "unet" / "config.json").write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["convert", "--sd", str(root / "sd2"), "--seesr", str(stock), "-o", str(tmp_path / "x")]) == 1
    assert "not a SeeSR unet" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(convert_args(root, tmp_path / "y", "--ram", str(tmp_path / "ram.pth")))
    assert code == 2 and "--tag-list" in caplog.text


def test_convert_with_dape_and_upscale_writes_tags(released, tmp_path):
    from test_dape_convert import dape_lora, original_layout
    from tiny_dape import TINY_DAPE_CONFIG, tiny_dape

    from dape.convert import convert_ram_checkpoint
    from seesr.cli.convert import DAPEFiles, convert_seesr

    root, _, _ = released
    architecture = {**TINY_DAPE_CONFIG, "projection_dim": 512}  # the SeeSR UNet's RCA width
    source = tiny_dape(projection_dim=512)
    torch.save({"model": original_layout(source)}, tmp_path / "ram.pth")
    torch.save(dape_lora(source, seed=1), tmp_path / "DAPE.pth")
    (tmp_path / "tags.txt").write_text("\n".join(source.config.tag_names))
    (tmp_path / "thresholds.txt").write_text("\n".join(map(str, source.config.tag_thresholds)))
    files = DAPEFiles(
        tmp_path / "ram.pth",
        tmp_path / "DAPE.pth",
        tmp_path / "tags.txt",
        tmp_path / "thresholds.txt",
        architecture=architecture,
    )
    out = convert_seesr(str(root / "sd2"), root / "seesr", tmp_path / "pipe", dape=files)
    pipe = SeeSRPipeline.from_pretrained(out)
    reference = convert_ram_checkpoint(
        *(getattr(files, f) for f in ("ram", "dape", "tag_list", "thresholds")),
        architecture=architecture,
        dtype=torch.float32,
    )
    image = lq_image(16, 16, seed=4)
    with torch.no_grad():
        x = reference.preprocess([image])
        expected = reference(x)
        got = pipe.prompt_extractor(pipe.prompt_extractor.preprocess([image]))
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, rtol=0, atol=0)
    tags = reference.tags(logits=expected.logits)[0]
    assert tags, "the tiny DAPE should produce at least one tag"
    result = pipe(
        image, prompt="sharp", num_inference_steps=1, process_size=64, generator=torch.Generator().manual_seed(0)
    )
    assert result.prompts == [f"{tags}, sharp,clean, high-resolution, 8k"]

    image.save(tmp_path / "lq.png")
    code = main(upscale_args(tmp_path, out, "--steps", "1", "--save-prompts"))
    assert code == 0 and (tmp_path / "sr" / "lq.txt").read_text() == f"{tags}, ,clean, high-resolution, 8k\n"


def test_convert_dape_only_folder(tmp_path, caplog):
    from test_dape_convert import original_layout
    from tiny_dape import TINY_DAPE_CONFIG, tiny_dape

    from dape import DAPEModel
    from seesr.cli.convert import DAPEFiles, convert_dape

    source = tiny_dape()
    torch.save({"model": original_layout(source)}, tmp_path / "ram.pth")
    (tmp_path / "tags.txt").write_text("\n".join(source.config.tag_names))
    (tmp_path / "thresholds.txt").write_text("\n".join(map(str, source.config.tag_thresholds)))
    files = DAPEFiles(tmp_path / "ram.pth", None, tmp_path / "tags.txt", tmp_path / "thresholds.txt", TINY_DAPE_CONFIG)
    out = convert_dape(files, tmp_path / "dape")
    loaded = DAPEModel.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with caplog.at_level(logging.ERROR):
        assert main(["convert", "--seesr", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
        assert (
            main(
                [
                    "convert",
                    "--ram",
                    str(tmp_path / "nope.pth"),
                    "--tag-list",
                    str(tmp_path / "tags.txt"),
                    "--tag-thresholds",
                    str(tmp_path / "thresholds.txt"),
                    "-o",
                    str(tmp_path / "y"),
                ]
            )
            == 1
        )
    assert "RAM checkpoint not found" in caplog.text and not (tmp_path / "y").exists()


def test_convert_osediff_and_upscale_with_it(tmp_path, caplog):
    """`seesr convert --osediff osediff.pkl --sd SD -o DIR` -> a folder `seesr upscale --model DIR` runs."""
    from PIL import Image
    from tiny_osediff import write_osediff_pkl

    from pipelines import OSEDiffPipeline

    write_sd2_folder(tmp_path / "sd2")
    pkl = write_osediff_pkl(tmp_path / "osediff.pkl", tmp_path / "sd2")
    out = tmp_path / "osediff"
    assert (
        main(["convert", "--osediff", str(tmp_path / "osediff.pkl"), "--sd", str(tmp_path / "sd2"), "-o", str(out)])
        == 0
    )
    assert not list(out.rglob("*.bin")) and (out / "unet" / "onestep_lora.safetensors").exists()
    pipe = OSEDiffPipeline.from_pretrained(out)
    unet_state = pipe.unet.state_dict()
    assert all(torch.equal(unet_state[k], v) for k, v in pkl["state_dict_unet"].items())
    vae_state = pipe.vae.state_dict()
    assert all(torch.equal(vae_state[k], v) for k, v in pkl["state_dict_vae"].items())
    lq_image(7, 9).save(tmp_path / "lq.png")
    args = upscale_args(tmp_path, out, "--process-size", "16")
    assert main([*args, "--save-prompts"]) == 0
    assert Image.open(tmp_path / "sr" / "lq.png").size == (28, 36)
    assert (tmp_path / "sr" / "lq.txt").read_text() == ",\n"  # no DAPE: f"{prompt},"
    # Strict: a tensor the SD UNet has no place for is an error naming it, and nothing is written.
    pkl["state_dict_unet"]["mid_block.extra.lora_A.default_others.weight"] = torch.zeros(4, 4)
    torch.save(pkl, tmp_path / "bad.pkl")
    caplog.clear()
    bad_args = ["convert", "--osediff", str(tmp_path / "bad.pkl"), "--sd", str(tmp_path / "sd2")]
    assert main([*bad_args, "-o", str(tmp_path / "bad")]) == 1
    assert "mid_block.extra.lora_A" in caplog.text and not (tmp_path / "bad").exists()
    assert main([*bad_args, "--seesr", str(tmp_path), "-o", str(tmp_path / "bad")]) == 2
