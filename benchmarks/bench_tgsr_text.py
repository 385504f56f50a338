"""Does TGSR follow the MEANING of the text? A benchmark where only the caption knows the details.

Data (seeded, `seesr.data.tgsr_synthetic.BENCHMARK_CLASSES`): 64 px HR images, a smooth random colour field plus one of
six fine grey patterns (vertical / horizontal / diagonal stripes, checks, dots, plain) of period 2-4 px. At x8 and
x16 the bicubic LRs of two classes on the same background are practically identical (the script prints their
LR-vs-LR PSNR), so only the caption can tell the model which pattern to draw. Training captions use the classes'
training phrasings; held-out phrasings (other words) are used only for testing.

Steps: write the training set, train through the public entry point (`accelerate launch train_tgsr.py --config
configs/tgsr.yaml data.train_data=... key=value ...`, timed; skipped with `--model`), then on a held-out test set at
x8 and x16 report
  * Y-PSNR of the output with the correct caption (a training phrasing), a wrong one (another class's), an empty
    one, and a held-out phrasing of the correct class;
  * the class accuracy of those outputs (a logistic-regression classifier fitted on HR images; its accuracy on
    the test HRs too);
  * the text-only ceiling: a logistic-regression classifier on the model's input text features (the encoder's
    L2-normalised mean-pooled sentence feature), fitted on the training phrasings, tested on the held-out ones;
and write a picture grid (LR, HR, correct, wrong, empty, held-out) to `docs/tgsr_text_grid.png`.

    python benchmarks/bench_tgsr_text.py                   # train (about 10 min on 2 CPU cores) and evaluate
    python benchmarks/bench_tgsr_text.py --model DIR       # evaluate a trained TGSR pipeline folder
    python benchmarks/bench_tgsr_text.py --text_encoder FOLDER_OR_PACKAGE   # train with another text encoder
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seesr.data.tgsr_synthetic import (  # noqa: E402
    BENCHMARK_CLASSES,
    detail_image,
    smooth_background,
    to_uint8,
    write_set,
)
from seesr.metrics import psnr  # noqa: E402

SIZE = 64
FACTORS = (8, 16)


def make_split(count_per_class: int, seed: int) -> list[tuple[np.ndarray, int, int]]:
    """`(hr uint8, class index, background id)`: every background carries every class (pairs share LRs)."""
    rng = np.random.default_rng(seed)
    items = []
    for background_id in range(count_per_class):
        background = smooth_background(SIZE, rng)
        for label, cls in enumerate(BENCHMARK_CLASSES):
            items.append((to_uint8(detail_image(background, cls.kind, cls.period)), label, background_id))
    return items


def downscale(hr: np.ndarray, factor: int) -> Image.Image:
    return Image.fromarray(hr).resize((SIZE // factor, SIZE // factor), Image.BICUBIC)


def lr_vs_lr_psnr(items, factor: int) -> tuple[float, float]:
    """Min and mean PSNR between the LRs of two classes on the same background."""
    by_background: dict[int, list[np.ndarray]] = {}
    for hr, _, background_id in items:
        by_background.setdefault(background_id, []).append(np.asarray(downscale(hr, factor)))
    values = []
    for lrs in by_background.values():
        for i in range(len(lrs)):
            for j in range(i + 1, len(lrs)):
                values.append(min(psnr(lrs[i], lrs[j], 0), 99.0))
    return min(values), float(np.mean(values))


def hr_features(images: np.ndarray) -> np.ndarray:
    """Shift-invariant texture features: |FFT| of the high-passed luminance (HR minus its 4x4 box blur)."""
    y = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(y)[:, None], 5, 1, 2, count_include_pad=False)
    high = y - blurred[:, 0].numpy()
    return np.abs(np.fft.rfft2(high)).reshape(len(images), -1)


def fit_classifier(features: np.ndarray, labels: np.ndarray):
    """Logistic regression on the raw spectra (no standardisation: frequencies that no HR class uses keep a
    near-zero weight, so faint artefacts there do not decide the class)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=3000).fit(features, labels)


def text_ceiling(pipe) -> float:
    """Held-out-phrasing accuracy of a logistic regression on the model's input sentence features."""
    from seesr.models.tgsr import encode_text

    train = [(p, i) for i, c in enumerate(BENCHMARK_CLASSES) for p in c.train]
    held = [(p, i) for i, c in enumerate(BENCHMARK_CLASSES) for p in c.held_out]

    def features(prompts):
        pooled = encode_text(pipe.text_encoder, pipe.tokenizer, prompts)[2].float()
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=5000).fit(features([p for p, _ in train]), [i for _, i in train])
    return float((clf.predict(features([p for p, _ in held])) == np.array([i for _, i in held])).mean())


def train(data_dir: Path, out_dir: Path, overrides: list[str], threads: int) -> tuple[Path, float]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--num_cpu_threads_per_process", str(threads),
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(ROOT / "train_tgsr.py"),
        "--config", str(ROOT / "configs" / "tgsr.yaml"),
        f"data.train_data={data_dir}", f"train.output_dir={out_dir}", *overrides,
    ]  # fmt: skip
    print("training:", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return out_dir / "pipeline", time.perf_counter() - start


def evaluate(pipe, test_items, classifier, factor: int, seed: int) -> tuple[dict, dict]:
    """Outputs for every condition, and {condition: (mean PSNR, class accuracy, followed-caption rate)}."""
    rng = np.random.default_rng(seed)
    names = len(BENCHMARK_CLASSES)
    prompts: dict[str, list[str]] = {"correct": [], "wrong": [], "empty": [], "held-out": []}
    intended: dict[str, list[int]] = {"correct": [], "wrong": [], "empty": [], "held-out": []}
    for _, label, _ in test_items:
        cls = BENCHMARK_CLASSES[label]
        other = (label + 1 + int(rng.integers(names - 1))) % names
        prompts["correct"].append(cls.train[int(rng.integers(len(cls.train)))])
        wrong = BENCHMARK_CLASSES[other].train
        prompts["wrong"].append(wrong[int(rng.integers(len(wrong)))])
        prompts["empty"].append("")
        prompts["held-out"].append(cls.held_out[int(rng.integers(len(cls.held_out)))])
        intended["correct"].append(label)
        intended["wrong"].append(other)
        intended["empty"].append(label)
        intended["held-out"].append(label)
    lrs = [downscale(hr, factor) for hr, _, _ in test_items]
    truth = np.array([label for _, label, _ in test_items])
    outputs, table = {}, {}
    for condition, texts in prompts.items():
        images = []
        for start in range(0, len(lrs), 32):
            batch = pipe(lrs[start : start + 32], texts[start : start + 32], upscale=factor, output_type="np")
            images.append((batch.images * 255).round().astype(np.uint8))
        images = np.concatenate(images)
        outputs[condition] = images
        predicted = classifier.predict(hr_features(images))
        scores = [psnr(out, hr, 0) for out, (hr, _, _) in zip(images, test_items)]
        table[condition] = (float(np.mean(scores)), float((predicted == truth).mean()),
                            float((predicted == np.array(intended[condition])).mean()))  # fmt: skip
    return outputs, table


def picture_grid(test_items, outputs, factor: int, path: Path, zoom: int = 2) -> None:
    """One row per class: LR (nearest), HR, correct, wrong, empty, held-out."""
    rows = []
    for label in range(len(BENCHMARK_CLASSES)):
        index = next(i for i, (_, lab, _) in enumerate(test_items) if lab == label)
        hr = test_items[index][0]
        lr = np.asarray(downscale(hr, factor).resize((SIZE, SIZE), Image.NEAREST))
        cells = [lr, hr] + [outputs[c][index] for c in ("correct", "wrong", "empty", "held-out")]
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a trained TGSR pipeline folder (skip training)")
    parser.add_argument("--work_dir", type=Path, default=None, help="data and run folder (default: a temp dir)")
    parser.add_argument("--train_per_class", type=int, default=150, help="training backgrounds (x 6 classes)")
    parser.add_argument("--test_per_class", type=int, default=20, help="test backgrounds (x 6 classes)")
    parser.add_argument("--steps", type=int, default=600, help="train.max_train_steps")
    parser.add_argument("--text_encoder", default=None, help="text encoder for training (default: the config's)")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "tgsr_text_grid.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the evaluation")
    parser.add_argument("--train_threads", type=int, default=1, help="threads of the training process")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for train_tgsr.py")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tgsr-text-"))
    train_items = make_split(args.train_per_class, seed=1)
    test_items = make_split(args.test_per_class, seed=2)
    for factor in FACTORS:
        low, mean = lr_vs_lr_psnr(test_items, factor)
        print(f"x{factor}: LR-vs-LR PSNR between classes on the same background: min {low:.2f} dB, mean {mean:.2f}")
    model = args.model
    if model is None:
        rng = np.random.default_rng(3)
        data = [(hr.astype(np.float64) / 255, BENCHMARK_CLASSES[label].train[int(rng.integers(5))])
                for hr, label, _ in train_items]  # fmt: skip
        write_set(work / "train", data, "img")
        overrides = [
            "data.resolution=64", "data.upscale_factors=[8,16]", "data.random_flip=false", "data.repeats=1",
            f"train.max_train_steps={args.steps}", "train.checkpointing_steps=100000", "train.report_to=none",
            "train.lr_warmup_steps=50", "train.logging_steps=100", *args.overrides,
        ]  # fmt: skip
        if args.text_encoder:
            overrides.append(f"text_encoder={args.text_encoder}")
        model, seconds = train(work / "train", work / "run", overrides, args.train_threads)
        print(f"trained {args.steps} steps through train_tgsr.py in {seconds / 60:.1f} min "
              f"({args.train_threads} thread(s))")  # fmt: skip
    from pipelines.pipeline_tgsr import TGSRPipeline

    pipe = TGSRPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    hr_train = np.stack([hr for hr, _, _ in train_items])
    classifier = fit_classifier(hr_features(hr_train), np.array([label for _, label, _ in train_items]))
    hr_test = np.stack([hr for hr, _, _ in test_items])
    truth = np.array([label for _, label, _ in test_items])
    hr_accuracy = float((classifier.predict(hr_features(hr_test)) == truth).mean())
    ceiling = text_ceiling(pipe)
    print(f"classifier accuracy on test HRs: {hr_accuracy:.1%}; text-only ceiling on held-out phrasings: "
          f"{ceiling:.1%}")  # fmt: skip
    for factor in FACTORS:
        outputs, table = evaluate(pipe, test_items, classifier, factor, seed=factor)
        print(f"\nx{factor} ({len(test_items)} test images)   Y-PSNR   class acc.  follows caption")
        for condition, (score, accuracy, follows) in table.items():
            print(f"  {condition:<10}  {score:8.2f}  {accuracy:9.1%}  {follows:9.1%}")
        gap = table["correct"][0] - table["wrong"][0]
        print(f"  correct - wrong: {gap:+.2f} dB; accuracy correct - wrong: "
              f"{(table['correct'][1] - table['wrong'][1]) * 100:+.1f} points")  # fmt: skip
        if factor == FACTORS[0]:
            picture_grid(test_items, outputs, factor, args.grid)
            print(f"  picture grid: {args.grid}")


if __name__ == "__main__":
    main()
