"""End-to-end CPU demonstration of one-step (OSEDiff) training on real photos: does it beat bicubic?

No Stable Diffusion weights can be downloaded here, so the script first makes a *tiny base model* standing in for
SD 2.1-base, whose VAE and UNet are pretrained: (1) a small VAE trained as an autoencoder on the training crops
(seeded, 2500 steps; its log-variance starts small, as a trained VAE's is, so the posterior sample is not mostly
noise) and (2) a small UNet trained as a latent denoiser (all timesteps, as SD) on that VAE's latents, with a random
CLIP text encoder (the prompts carry no information). Then the public entry point
`accelerate launch train_osediff.py --config configs/osediff.yaml ...` fine-tunes it into a one-step SR model with
the recipe (LoRA on the VAE encoder and the UNet, conv_in, MSE; `--lambda-vsd 1` adds the recipe's VSD with a LoRA
fake score, which hurts on this base; LPIPS off: no VGG/LPIPS weights ship in any package), and the exported
folder is evaluated with the real `OSEDiffPipeline` on held-out photos against bicubic upscaling and against the
frozen VAE's own reconstruction of the GT (the ceiling: OSEDiff never trains the decoder).

The generator runs at `--timestep` (default 200, the trainer's `timestep` key; OSEDiff's 999 is `--timestep 999`):
at t=999 the one step x0 = (z - 0.9977 eps) / 0.0683 multiplies every error of the UNet by 14.6, and a tiny UNet
trained for minutes cannot learn the near-identity that pretrained SD supplies; at t=200 the factor is 1.15.

Photos: scikit-image's and scikit-learn's bundled images (`pip install scikit-image scikit-learn`); training and
evaluation pairs come from `seesr make-pairs` (Real-ESRGAN degradation, x4).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/onestep_demo.py [--work /tmp/onestep-demo] [--steps 400]
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
RESOLUTION = 32  # crop side of the base pre-training; one-step training crops are --resolution (default 64)
HELD_OUT_SIZE = 64
HELD_OUT_SEEDS = 8  # 8 random crops of each held-out photo: 16 (LQ, GT) pairs


def photo(name: str) -> Path:
    import skimage
    import sklearn

    for folder in (Path(skimage.__file__).parent / "data", Path(sklearn.__file__).parent / "datasets" / "images"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name}: not found in scikit-image / scikit-learn data")


def make_data(work: Path) -> tuple[Path, list[Path]]:
    """Training GT crops (`make-pairs`, 256 px, one per photo and seed) and held-out (lq, gt) pair folders (64 px GT,
    one crop per held-out photo and seed). Folders made by an earlier run are reused (make-pairs is deterministic)."""
    from seesr.data.degradation import DegradationConfig
    from seesr.data.pairs import make_pairs

    config = DegradationConfig(usm_sharpen_gt=False)  # the GT as it is: OSEDiff's targets, and the held-out GT
    listing = work / "train.txt"
    if not listing.is_file():
        for seed in range(3):
            make_pairs([photo(n) for n in TRAIN_PHOTOS], work / f"train-{seed}", config, seed=seed, resolution=256,
                       progress=False)  # fmt: skip
        files = [p for s in range(3) for p in sorted((work / f"train-{s}" / "gt").glob("*"))]
        listing.write_text("\n".join(str(p) for p in files))
    held = [work / f"heldout-{seed}" for seed in range(HELD_OUT_SEEDS)]
    for seed, folder in enumerate(held):
        if not (folder / "lq").is_dir():
            names = [photo(n) for n in HELD_OUT]
            make_pairs(names, folder, config, seed=100 + seed, resolution=HELD_OUT_SIZE, progress=False)
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


def pretrain_vae(images: list[torch.Tensor], steps: int, generator: torch.Generator):
    """The stand-in for SD's pretrained VAE: an autoencoder trained on the training crops (L1 + 1e-6 KL).

    One level (no downsampling) and no mid-block attention: it learns a near-lossless 4-channel code in a few
    minutes of CPU (SD's VAE downsamples x8; at this size a downsampling VAE trained for minutes would cap the quality
    below bicubic, since OSEDiff keeps the decoder frozen). The posterior's log-variance starts at -10 (std 0.007),
    where a trained VAE's ends, instead of 0: otherwise minutes of training spend themselves on shrinking the noise
    of the posterior sample that OSEDiff encodes. One-cycle learning rate, peak 2e-3.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=RESOLUTION, scaling_factor=0.5,
                        mid_block_add_attention=False)  # fmt: skip
    with torch.no_grad():
        vae.quant_conv.weight[4:] *= 0.01
        vae.quant_conv.bias[4:] = -10.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        x = crops(images, 8, generator)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            logging.info("VAE step %d: L1 %.4f", step, loss.item())
    return vae.eval().requires_grad_(False)


def pretrain_unet(vae, images: list[torch.Tensor], steps: int, generator: torch.Generator):
    """The stand-in for SD's pretrained UNet: an epsilon-prediction latent denoiser over all 1000 timesteps (as SD
    was trained), on the VAE's latents of the training crops, with the empty prompt of the random text encoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tiny import SD2_SCHEDULER, tiny_text_encoder, tiny_tokenizer

    from seesr.conditioning import encode_prompt

    scheduler = DDPMScheduler.from_config(SD2_SCHEDULER)
    tokenizer, text_encoder = tiny_tokenizer(), tiny_text_encoder()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, layers_per_block=1, norm_num_groups=8,
                                sample_size=RESOLUTION)  # fmt: skip
    empty = encode_prompt(tokenizer, text_encoder, [""] * 8)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0)
    for step in range(steps):
        with torch.no_grad():
            latents = vae.encode(crops(images, 8, generator)).latent_dist.sample(generator=generator) * 0.5
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (8,), generator=generator)
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=empty).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logging.info("UNet step %d: eps MSE %.4f", step, loss.item())
    return unet, scheduler, tokenizer, text_encoder


def make_base(work: Path, files: list[Path], vae_steps: int, unet_steps: int) -> Path:
    """A tiny SD-2-layout folder whose VAE and UNet were pretrained here (autoencoder, then latent denoiser)."""
    base = work / "tiny-sd"
    images = load_images(files)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vae = pretrain_vae(images, vae_steps, generator)
    unet, scheduler, tokenizer, text_encoder = pretrain_unet(vae, images, unet_steps, generator)
    for name, part in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder), ("tokenizer", tokenizer),
                       ("scheduler", scheduler)):  # fmt: skip
        part.save_pretrained(base / name)
    return base


def y_psnr(a: np.ndarray, b: np.ndarray) -> float:
    from seesr.metrics import psnr

    return psnr(a, b, crop_border=4, y_channel=True)


def held_out_pairs(held: list[Path]) -> list[tuple[str, np.ndarray, object]]:
    """(name, GT uint8 array, LQ PIL image) of every held-out crop."""
    from PIL import Image

    pairs = []
    for folder in held:
        for lq_path in sorted((folder / "lq").glob("*.png")):
            gt = np.asarray(Image.open(folder / "gt" / lq_path.name).convert("RGB"))
            pairs.append((f"{folder.name}/{lq_path.name}", gt, Image.open(lq_path).convert("RGB")))
    return pairs


@torch.no_grad()
def vae_reconstruction(vae, gt: np.ndarray) -> np.ndarray:
    """The frozen VAE's reconstruction of the GT (posterior sample, seed 0): no generator can beat it by much."""
    x = torch.from_numpy(gt.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    latents = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    out = vae.decode(latents).sample.clamp(-1, 1)[0].permute(1, 2, 0)
    return ((out + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def evaluate(pipeline_dir: Path, base: Path, held: list[Path], timestep: int) -> dict:
    """Y-PSNR of bicubic, the VAE ceiling, the untrained base as a one-step model and the trained export."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel

    from pipelines import OSEDiffPipeline

    trained = OSEDiffPipeline.from_pretrained(pipeline_dir)
    untrained = OSEDiffPipeline(
        AutoencoderKL.from_pretrained(base / "vae"), CLIPTextModel.from_pretrained(base / "text_encoder"),
        AutoTokenizer.from_pretrained(base / "tokenizer"), UNet2DConditionModel.from_pretrained(base / "unet"),
        DDPMScheduler.from_pretrained(base / "scheduler"), timestep=timestep,
    )  # fmt: skip
    rows = []
    for name, gt, lq in held_out_pairs(held):
        row = {"image": name, "bicubic": y_psnr(np.asarray(lq.resize(gt.shape[1::-1], Image.BICUBIC)), gt)}
        row["vae_ceiling"] = y_psnr(vae_reconstruction(untrained.vae, gt), gt)
        for key, pipe in (("untrained", untrained), ("onestep", trained)):
            pipe.set_progress_bar_config(disable=True)
            out = pipe(image=lq, upscale=4, process_size=HELD_OUT_SIZE, generator=torch.Generator().manual_seed(0),
                       color_fix=None).images[0]  # fmt: skip
            row[key] = y_psnr(np.asarray(out.convert("RGB")), gt)
        rows.append(row)
    means = {key: float(np.mean([r[key] for r in rows])) for key in ("bicubic", "vae_ceiling", "untrained", "onestep")}
    return {"rows": rows, **means, "wins": sum(r["onestep"] > r["bicubic"] for r in rows)}


def train(args, base: Path, listing: Path, out: Path) -> None:
    """`accelerate launch train_osediff.py --config configs/osediff.yaml ...` (one CPU process), as a user runs it."""
    import os
    import shutil
    import subprocess

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    launch = [accelerate, "launch", "--num_processes=1", "--num_machines=1", "--mixed_precision=no",
              "--dynamo_backend=no", "--cpu"]  # fmt: skip
    overrides = {
        "pretrained_model": base, "dape_model": "null", "neg_prompt": "''", "lora_rank": args.lora_rank,
        "timestep": args.timestep, "export_pkl": str(args.timestep == 999).lower(),
        "data.train_data": listing, "data.resolution": args.resolution,
        "loss.lambda_lpips": 0, "loss.lpips_weights": "[]", "loss.lambda_vsd": args.lambda_vsd,
        "train.output_dir": out, "train.max_train_steps": args.steps, "train.train_batch_size": 4,
        "train.learning_rate": args.lr, "train.mixed_precision": "'no'", "train.report_to": "none",
        "train.logging_steps": 50, "train.seed": 0, "train.checkpointing_steps": args.steps,
    }  # fmt: skip
    command = [*launch, str(ROOT / "train_osediff.py"), "--config", str(ROOT / "configs" / "osediff.yaml")]
    command += [f"{key}={value}" for key, value in overrides.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    logging.info("%s", " ".join(str(c) for c in command))
    subprocess.run(command, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/onestep-demo"))
    parser.add_argument("--steps", type=int, default=300, help="one-step training steps")
    parser.add_argument("--base-steps", type=int, nargs=2, default=(2500, 400), help="VAE and UNet pre-training")
    parser.add_argument("--timestep", type=int, default=200, help="the generator's timestep (OSEDiff: 999)")
    parser.add_argument("--resolution", type=int, default=64, help="one-step training crops (held-out: 64)")
    parser.add_argument("--lambda-vsd", type=float, default=0.0, help="VSD weight (the recipe: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--reuse-base", action="store_true", help="keep WORK/tiny-sd from an earlier run")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the run's existing export again")
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
    name = f"t{args.timestep}-px{args.resolution}-r{args.lora_rank}-vsd{args.lambda_vsd:g}-lr{args.lr:g}-s{args.steps}"
    out = args.work / f"run-{name}"
    if not args.evaluate_only:
        train(args, base, listing, out)
    train_time = time.time() - start - base_time
    if args.evaluate_only and (out / "result.json").is_file():  # keep the measured training time
        train_time = json.loads((out / "result.json").read_text())["train_minutes"] * 60
    result = evaluate(out / "pipeline", base, held, args.timestep)
    result |= {"base_minutes": base_time / 60, "train_minutes": train_time / 60, "steps": args.steps}
    result |= {"timestep": args.timestep, "lora_rank": args.lora_rank, "lambda_vsd": args.lambda_vsd,
               "learning_rate": args.lr, "base_steps": list(args.base_steps)}  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"held-out Y-PSNR over {len(result['rows'])} crops: bicubic {result['bicubic']:.2f} dB, VAE ceiling "
        f"{result['vae_ceiling']:.2f} dB, untrained base {result['untrained']:.2f} dB, one-step "
        f"{result['onestep']:.2f} dB (beats bicubic on {result['wins']}/{len(result['rows'])}; base "
        f"{base_time / 60:.1f} min, one-step training {train_time / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
