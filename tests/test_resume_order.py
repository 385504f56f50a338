"""A resumed run continues the exact data order it left (shuffled loader, across an epoch boundary)."""

import torch
from torch.utils.data import DataLoader

from seesr.training.loop import TrainingArgs, epoch_batches, make_accelerator, resume_step, save_checkpoint


def take(batches, n):
    return [next(batches).tolist() for _ in range(n)]


def test_resume_skips_into_the_same_shuffled_order(tmp_path):
    args = TrainingArgs(output_dir=str(tmp_path), seed=3, report_to="none")
    accelerator = make_accelerator(args, "order")
    loader = accelerator.prepare(DataLoader(list(range(12)), batch_size=4, shuffle=True))
    straight = take(epoch_batches(accelerator, loader, 0), 7)  # 3 batches per epoch: crosses two boundaries
    assert straight[0:3] != straight[3:6]  # a new order every epoch

    accelerator = make_accelerator(args, "order")
    loader = accelerator.prepare(DataLoader(list(range(12)), batch_size=4, shuffle=True))
    first = take(epoch_batches(accelerator, loader, 0), 2)
    save_checkpoint(accelerator, tmp_path, 2, None)
    torch.manual_seed(1234)  # the global RNG moves on (as it would in another process)
    torch.randperm(100)

    accelerator = make_accelerator(args, "order")
    loader = accelerator.prepare(DataLoader(list(range(12)), batch_size=4, shuffle=True))
    step = resume_step(accelerator, tmp_path, "latest")
    assert step == 2
    assert first + take(epoch_batches(accelerator, loader, step), 5) == straight
