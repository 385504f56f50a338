"""Every sampler offered by `seesr upscale --scheduler` runs in SeeSRPipeline (tiny models)."""

import numpy as np
import pytest
import torch
from tiny import lq_image, tiny_pipeline

from pipelines.presets import SCHEDULERS, make_scheduler

STOCHASTIC = {"ddpm", "euler-a", "kdpm2-a", "dpm-sde"}
#: Deterministic ODE solvers: more steps must come closer to a fine reference solution of the same ODE.
ODE = sorted(set(SCHEDULERS) - STOCHASTIC)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, name, steps, seed=0, trailing=False, **kwargs):
    config = dict(pipe.scheduler.config)
    if trailing:
        config["timestep_spacing"] = "trailing"  # every step count then starts at t=999
    saved = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler(name, config)
        return pipe(
            lq_image(16, 16),
            num_inference_steps=steps,
            process_size=64,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        ).images
    finally:
        pipe.scheduler = saved


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_runs(pipe, name):
    out = _run(pipe, name, 2, output_type="np")
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 1e-3
    if name in STOCHASTIC:  # all randomness (the steps' noise included) comes from the generator
        np.testing.assert_array_equal(out, _run(pipe, name, 2, output_type="np"))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_start_point_is_the_first_noise_level(pipe, name):
    """The LR start, as the model sees it (scale_model_input), is sqrt(a) z + sqrt(1 - a) n at the first step."""
    scheduler = make_scheduler(name, pipe.scheduler.config)
    scheduler.set_timesteps(4)
    t0 = scheduler.timesteps[0]
    generator = torch.Generator().manual_seed(0)
    z, n = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    saved = pipe.scheduler
    try:
        pipe.scheduler = scheduler
        start = pipe.noise_to_timestep(z, n, t0, first_step=True)
        seen = scheduler.scale_model_input(start, t0)
    finally:
        pipe.scheduler = saved
    if getattr(scheduler, "sigmas", None) is not None and name not in ("ddpm", "ddim", "pndm"):
        sigma = scheduler.sigmas[0].double()
        alpha = 1 / (1 + sigma**2)
    else:
        alpha = scheduler.alphas_cumprod[int(t0)].double()
    expected = alpha.sqrt() * z.double() + (1 - alpha).sqrt() * n.double()
    torch.testing.assert_close(seen.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(pipe):
    """A fine solution of the probability-flow ODE from the same start (DPM-Solver++ 2M, 40 steps, no CFG)."""
    return _run(pipe, "dpm", 40, trailing=True, guidance_scale=1.0, output_type="latent")


@pytest.mark.parametrize("name", ODE)
def test_more_steps_come_closer_to_the_ode_solution(pipe, reference, name):
    few, more = (_run(pipe, name, steps, trailing=True, guidance_scale=1.0, output_type="latent") for steps in (3, 10))
    err_few, err_more = (float((x - reference).abs().mean()) for x in (few, more))
    assert err_more < 0.7 * err_few, (err_few, err_more)


def test_ddpm_default_still_starts_at_999(pipe):
    """DDPM keeps the original's start (LR latent noised at t=999, although the first step is 501)."""
    lr = _run(pipe, "ddpm", 2, output_type="latent")
    first = _run(pipe, "ddpm", 2, output_type="latent", start_timestep=None)
    assert not torch.allclose(lr, first)
