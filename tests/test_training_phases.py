"""`TrainingJob.phases`: further optimizers stepped in turn on every micro-batch (OSEDiff: generator, then fake score).

A toy "student" is fitted to the targets by the job's own loss; a toy "critic" (second phase, own optimizer and
schedule) is fitted to the student's detached output, which the first phase hands on in its terms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_training import Toy, _args, _state
from test_training_loop import Pairs

from seesr.training.loop import (
    LossPhase,
    TrainingJob,
    list_checkpoints,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    run_training,
    shuffled_loader,
    step_generator,
)


def student_loss(models, batch, generator):
    shift = 0.1 * torch.randn((), generator=generator)  # a draw of the step generator
    output = models["student"](batch["x"] + shift)
    return {"loss": F.mse_loss(output, batch["y"]), "output": output.detach()}


def critic_loss(models, batch, generator, terms):
    shift = 0.1 * torch.randn((), generator=generator)  # the same generator, continued after the first phase
    return {"loss_critic": F.mse_loss(models["critic"](batch["x"]), terms["output"] + shift)}


def two_phase_job(args, seed: int = 0, critic=critic_loss) -> TrainingJob:
    torch.manual_seed(seed)  # a resumed run starts from other weights on purpose: the checkpoint must restore them
    student, critic_model = Toy(), Toy()
    return TrainingJob(
        models={"student": student, "critic": critic_model},
        params=[p for p in student.parameters() if p.requires_grad],
        loader=shuffled_loader(Pairs(), args),
        loss=student_loss,
        export=lambda models: args.output_dir,
        export_dir=args.output_dir,
        phases=[LossPhase([p for p in critic_model.parameters() if p.requires_grad], critic, "loss_critic")],
    )


def reference(args, steps: int) -> tuple[Toy, Toy]:
    """The two phases by hand, without accelerate: one full batch per step (the loss is order-independent)."""
    torch.manual_seed(0)
    student, critic = Toy(), Toy()
    data = Pairs()
    batch = {"x": data.x, "y": data.x.sum(1, keepdim=True)}
    optimizers, schedulers = [], []
    for model in (student, critic):
        optimizers.append(make_optimizer([p for p in model.parameters() if p.requires_grad], args))
        schedulers.append(make_lr_scheduler(optimizers[-1], args, num_processes=1))
    for step in range(steps):
        generator = step_generator(torch.device("cpu"), args.seed, step, 0)
        terms = student_loss({"student": student}, batch, generator)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizers[0].step(), schedulers[0].step(), optimizers[0].zero_grad()
        critic_loss({"critic": critic}, batch, generator, terms)["loss_critic"].backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
        optimizers[1].step(), schedulers[1].step(), optimizers[1].zero_grad()
    return student, critic


def test_phases_step_in_turn_like_the_hand_written_loop(tmp_path):
    args = _args(tmp_path, max_train_steps=3, train_batch_size=6, max_grad_norm=0.5)
    job = two_phase_job(args)
    before = {name: _state(model) for name, model in job.models.items()}
    run_training(make_accelerator(args, "phases"), args, job)
    expected = dict(zip(("student", "critic"), reference(args, 3), strict=True))
    for name, model in job.models.items():
        state = _state(model)
        assert any(not torch.equal(state[k], before[name][k]) for k in state), f"{name} did not train"
        for key, value in _state(expected[name]).items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=f"{name}.{key}")
    # frozen weights stay frozen; each optimizer and schedule is checkpointed
    assert all(torch.equal(_state(m)["frozen.weight"], before[n]["frozen.weight"]) for n, m in job.models.items())
    _, checkpoint = list_checkpoints(tmp_path)[-1]
    names = {p.name for p in checkpoint.iterdir()}
    assert {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"} <= names


def test_phases_resume_exactly(tmp_path):
    straight = _args(tmp_path / "straight", max_train_steps=4, train_batch_size=2)
    job = two_phase_job(straight)
    run_training(make_accelerator(straight, "phases"), straight, job)
    first = _args(tmp_path / "resumed", max_train_steps=2, train_batch_size=2)
    run_training(make_accelerator(first, "phases"), first, two_phase_job(first))
    resumed_args = _args(tmp_path / "resumed", max_train_steps=4, train_batch_size=2, resume="latest")
    resumed = two_phase_job(resumed_args, seed=1)
    run_training(make_accelerator(resumed_args, "phases"), resumed_args, resumed)
    for name, model in job.models.items():
        for key, value in _state(resumed.models[name]).items():
            assert torch.equal(value, _state(model)[key]), f"{name}.{key}: resume diverged"


def test_a_non_finite_phase_loss_stops_the_run(tmp_path):
    args = _args(tmp_path, max_train_steps=3)
    nan = lambda models, batch, generator, terms: {"loss_critic": models["critic"](batch["x"]).sum() * float("nan")}  # noqa: E731
    with pytest.raises(RuntimeError, match="step 1: the loss_critic is not finite"):
        run_training(make_accelerator(args, "phases"), args, two_phase_job(args, critic=nan))
