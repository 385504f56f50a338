"""The shared training loop (`TrainingJob` + `run_training`) on a toy model: exact resume, hooks, export, errors."""

from __future__ import annotations

import pytest
import torch
from test_training import Toy, _args, _state
from torch.utils.data import Dataset

from seesr.training.loop import TrainingJob, list_checkpoints, make_accelerator, run_training, shuffled_loader


class Pairs(Dataset):
    def __init__(self, count: int = 6) -> None:
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(count, 4, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.x[index].sum(0, keepdim=True)}


def toy_job(args, calls: dict, seed: int = 0) -> TrainingJob:
    torch.manual_seed(seed)  # a resumed run starts from other weights on purpose: the checkpoint must restore them
    model = Toy()

    def loss(models, batch, generator):
        noise = 0.01 * torch.randn(batch["x"].shape, generator=generator, device=generator.device)
        calls["batches"].append(batch["x"].clone())
        prediction = models["toy"](batch["x"] + noise)
        return {"loss": torch.nn.functional.mse_loss(prediction, batch["y"]), "extra": prediction.mean()}

    def export(models):
        calls["exported"].append(models["toy"])
        return args_dir(args) / "export"

    return TrainingJob(
        models={"toy": model},
        params=[p for p in model.parameters() if p.requires_grad],
        loader=shuffled_loader(Pairs(), args),
        loss=loss,
        export=export,
        export_dir=args_dir(args) / "export",
        validate=lambda models, step: calls["validated"].append(step),
        validation_steps=2,
        description="toy",
    )


def args_dir(args):
    from pathlib import Path

    return Path(args.output_dir)


def run(args, seed: int = 0):
    calls = {"batches": [], "exported": [], "validated": []}
    job = toy_job(args, calls, seed)
    export = run_training(make_accelerator(args, "toy"), args, job)
    return job, calls, export


def test_run_training_resumes_exactly_and_calls_the_hooks(tmp_path):
    ref_job, ref_calls, export = run(_args(tmp_path / "ref", max_train_steps=5, train_batch_size=2))
    assert export == tmp_path / "ref" / "export"
    assert ref_calls["exported"] == [ref_job.models["toy"]]  # once, unwrapped
    assert ref_calls["validated"] == [2, 4, 5]  # every validation_steps and at the end
    assert [s for s, _ in list_checkpoints(tmp_path / "ref")] == [4, 5]

    first_job, first_calls, _ = run(_args(tmp_path / "run", max_train_steps=3, train_batch_size=2))
    assert first_calls["validated"] == [2, 3]
    _, resumed_calls, _ = run(_args(tmp_path / "run", max_train_steps=5, train_batch_size=2, resume="latest"), seed=1)
    resumed = resumed_calls["exported"][0]
    # Same batches (order and position across the epoch boundary) and the same weights as the uninterrupted run.
    for got, expected in zip(first_calls["batches"] + resumed_calls["batches"], ref_calls["batches"], strict=True):
        assert torch.equal(got, expected)
    reference = _state(ref_calls["exported"][0])
    for key, value in _state(resumed).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    assert any(not torch.equal(v, _state(first_job.models["toy"])[k]) for k, v in reference.items())


def test_a_non_finite_loss_stops_the_run(tmp_path):
    args = _args(tmp_path, max_train_steps=3)
    job = toy_job(args, {"batches": [], "exported": [], "validated": []})
    job.loss = lambda models, batch, generator: {"loss": models["toy"](batch["x"]).sum() * float("nan")}
    with pytest.raises(RuntimeError, match="step 1: the loss is not finite"):
        run_training(make_accelerator(args, "toy"), args, job)
