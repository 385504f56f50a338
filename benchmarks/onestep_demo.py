"""End-to-end CPU demonstration of one-step (OSEDiff) training on real photos, in about ten minutes.

No Stable Diffusion weights can be downloaded here, so the script first makes a *tiny base model* the way SD was
made, only minutes instead of GPU-months: a small VAE trained as an autoencoder and a small UNet trained as a
latent denoiser on the training crops (random CLIP text encoder: the prompts carry no information). Then
`train_osediff.py`'s trainer fine-tunes it into a one-step SR model with the real recipe (LoRA on the VAE encoder
and the UNet, conv_in, MSE, VSD with a LoRA fake score; LPIPS off: no VGG/LPIPS weights ship in any package), and
the exported folder is evaluated with the real `OSEDiffPipeline` on held-out photos against bicubic upscaling.

Photos: scikit-image's and scikit-learn's bundled images (`pip install scikit-image scikit-learn`); training and
evaluation pairs come from `seesr make-pairs` (Real-ESRGAN degradation, x4).

    python benchmarks/onestep_demo.py [--work /tmp/onestep-demo] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TRAIN_PHOTOS = ["astronaut.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
                "retina.jpg", "ihc.png", "china.jpg"]  # fmt: skip
HELD_OUT = ["coffee.png", "flower.jpg"]
RESOLUTION = 32  # training crop side (LQ 8 px); held-out GT crops are 64 px (LQ 16 px)
HELD_OUT_SIZE = 64


def photo(name: str) -> Path:
    import skimage
    import sklearn

    for folder in (Path(skimage.__file__).parent / "data", Path(sklearn.__file__).parent / "datasets" / "images"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name}: not found in scikit-image / scikit-learn data")


def make_data(work: Path) -> tuple[Path, list[Path]]:
    """Training GT crops (`make-pairs`, 256 px, one per photo and seed) and held-out (lq, gt) pair folders."""
    from seesr.data.degradation import DegradationConfig
    from seesr.data.pairs import make_pairs

    train = [photo(n) for n in TRAIN_PHOTOS]
    listing = work / "train.txt"
    held = [work / f"heldout-{seed}" for seed in range(3)]
    if listing.is_file() and all((folder / "lq").is_dir() for folder in held):
        return listing, held  # made by an earlier run (make-pairs is deterministic)
    for seed in range(3):
        make_pairs(train, work / f"train-{seed}", DegradationConfig(), seed=seed, resolution=256, progress=False)
    for seed, folder in enumerate(held):
        config = DegradationConfig(usm_sharpen_gt=False)
        names = [photo(n) for n in HELD_OUT]
        make_pairs(names, folder, config, seed=100 + seed, resolution=HELD_OUT_SIZE, progress=False)
    listing.write_text("\n".join(str(p) for s in range(3) for p in sorted((work / f"train-{s}" / "gt").glob("*"))))
    return listing, held


def load_images(files: list[Path]) -> list[torch.Tensor]:
    from PIL import Image

    return [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255 for f in files]


def crops(images: list[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        image = images[int(torch.randint(len(images), (), generator=generator))]
        top = int(torch.randint(image.shape[1] - RESOLUTION + 1, (), generator=generator))
        left = int(torch.randint(image.shape[2] - RESOLUTION + 1, (), generator=generator))
        out.append(image[:, top : top + RESOLUTION, left : left + RESOLUTION])
    return torch.stack(out) * 2 - 1


def make_base(work: Path, files: list[Path], vae_steps: int, unet_steps: int) -> Path:
    """A tiny SD-2-layout folder whose VAE and UNet were trained here (autoencoder, then latent denoiser)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tiny import SD2_SCHEDULER, tiny_text_encoder, tiny_tokenizer

    from seesr.conditioning import encode_prompt

    base = work / "tiny-sd"
    images = load_images(files)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # One level (no downsampling) and no mid-block attention: a VAE that learns a near-lossless 4-channel code in a
    # few hundred CPU steps. (SD's VAE downsamples x8; at this size a downsampling VAE trained for minutes would cap
    # the quality below bicubic, since OSEDiff keeps the decoder frozen.)
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=RESOLUTION, scaling_factor=0.5,
                        mid_block_add_attention=False)  # fmt: skip
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0)
    for step in range(vae_steps):
        x = crops(images, 8, generator)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == vae_steps - 1:
            logging.info("VAE step %d: L1 %.4f", step, loss.item())
    vae.eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_config(SD2_SCHEDULER)
    tokenizer, text_encoder = tiny_tokenizer(), tiny_text_encoder()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, layers_per_block=1, norm_num_groups=8,
                                sample_size=RESOLUTION)  # fmt: skip
    empty = encode_prompt(tokenizer, text_encoder, [""] * 8)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0)
    for step in range(unet_steps):
        with torch.no_grad():
            latents = vae.encode(crops(images, 8, generator)).latent_dist.sample(generator=generator) * 0.5
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (8,), generator=generator)
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=empty).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == unet_steps - 1:
            logging.info("UNet step %d: eps MSE %.4f", step, loss.item())
    vae.save_pretrained(base / "vae")
    unet.save_pretrained(base / "unet")
    text_encoder.save_pretrained(base / "text_encoder")
    tokenizer.save_pretrained(base / "tokenizer")
    scheduler.save_pretrained(base / "scheduler")
    return base


def y_psnr(a: np.ndarray, b: np.ndarray) -> float:
    from seesr.metrics import psnr

    return psnr(a, b, crop_border=4, y_channel=True)


def evaluate(pipeline_dir: Path, held: list[Path]) -> dict:
    from PIL import Image

    from pipelines import OSEDiffPipeline

    pipe = OSEDiffPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for folder in held:
        for lq_path in sorted((folder / "lq").glob("*.png")):
            gt = np.asarray(Image.open(folder / "gt" / lq_path.name).convert("RGB"))
            lq = Image.open(lq_path).convert("RGB")
            bicubic = np.asarray(lq.resize(gt.shape[1::-1], Image.BICUBIC))
            out = pipe(image=lq, upscale=4, process_size=HELD_OUT_SIZE, generator=torch.Generator().manual_seed(0),
                       color_fix=None).images[0]  # fmt: skip
            ours = np.asarray(out.convert("RGB"))
            rows.append({"image": f"{folder.name}/{lq_path.name}", "bicubic": y_psnr(bicubic, gt),
                         "onestep": y_psnr(ours, gt)})  # fmt: skip
    return {"rows": rows, "bicubic": float(np.mean([r["bicubic"] for r in rows])),
            "onestep": float(np.mean([r["onestep"] for r in rows]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/onestep-demo"))
    parser.add_argument("--steps", type=int, default=300, help="one-step training steps")
    parser.add_argument("--base-steps", type=int, nargs=2, default=(300, 200), help="VAE and UNet pre-training")
    parser.add_argument("--lambda-vsd", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--reuse-base", action="store_true", help="keep WORK/tiny-sd from an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.time()
    listing, held = make_data(args.work)
    files = [Path(p) for p in listing.read_text().split()]
    base = args.work / "tiny-sd"
    if not (args.reuse_base and (base / "unet").is_dir()):
        base = make_base(args.work, files, *args.base_steps)
    base_time = time.time() - start
    from seesr.training.osediff import main as train_main

    out = args.work / f"run-r{args.lora_rank}-vsd{args.lambda_vsd:g}-lr{args.lr:g}-s{args.steps}"
    train_main(["--config", str(ROOT / "configs" / "osediff.yaml"), f"pretrained_model={base}", "dape_model=null",
                f"data.train_data={listing}", f"data.resolution={RESOLUTION}", "loss.lambda_lpips=0",
                "loss.lpips_weights=[]", f"loss.lambda_vsd={args.lambda_vsd}", f"train.output_dir={out}",
                f"train.max_train_steps={args.steps}", "train.train_batch_size=4", f"train.learning_rate={args.lr}",
                f"lora_rank={args.lora_rank}",
                "train.mixed_precision='no'", "train.report_to=none", "train.logging_steps=50", "train.seed=0",
                f"train.checkpointing_steps={args.steps}", "neg_prompt=''"])  # fmt: skip
    train_time = time.time() - start - base_time
    result = evaluate(out / "pipeline", held)
    result |= {"base_minutes": base_time / 60, "train_minutes": train_time / 60, "steps": args.steps}
    result |= {"lora_rank": args.lora_rank, "lambda_vsd": args.lambda_vsd, "learning_rate": args.lr}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"held-out Y-PSNR over {len(result['rows'])} crops: bicubic {result['bicubic']:.2f} dB, one-step "
        f"{result['onestep']:.2f} dB (base {base_time / 60:.1f} min, one-step training {train_time / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
