"""Schedulers against the diffusers reference implementations, step for step."""

import pytest
import torch

from lightx2v.errors import UserError
from lightx2v.schedulers import FlowEulerScheduler, FlowUniPCScheduler, make_scheduler

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5  # max |ours - ref| / max |ref|, checked after every step
SHAPE = (1, 16, 3, 8, 8)  # a small video latent [B, C, F, H, W]


def ref_unipc(shift, solver_order=2):
    # The released Wan2.1-diffusers scheduler config, other settings at their defaults.
    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        num_train_timesteps=1000,
        solver_order=solver_order,
    )


def ref_euler(shift):
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_both(ours, ref, steps, seed=0):
    """Run both schedulers on their own trajectories with the same random model outputs; return the worst error."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x_ours = x_ref = torch.randn(SHAPE, generator=g)
    worst = 0.0
    for t in ref.timesteps:
        v = torch.randn(SHAPE, generator=g)
        x_ref = ref.step(v, t, x_ref).prev_sample
        x_ours = ours.step(v, x_ours)
        worst = max(worst, rel_err(x_ours, x_ref))
    return worst, x_ours, x_ref


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.0])
@pytest.mark.parametrize("steps", [50, 20, 4])
def test_unipc_matches_diffusers(shift, steps):
    ours, ref = FlowUniPCScheduler(shift=shift), ref_unipc(shift)
    worst, _, _ = run_both(ours, ref, steps)
    assert ours.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, ref.timesteps.float())  # whole numbers, as diffusers feeds the model
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert worst <= RTOL


@pytest.mark.parametrize("solver_order", [1, 3])
def test_unipc_other_orders_match_diffusers(solver_order):
    worst, _, _ = run_both(FlowUniPCScheduler(shift=5.0, solver_order=solver_order), ref_unipc(5.0, solver_order), 20)
    assert worst <= RTOL


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.0])
@pytest.mark.parametrize("steps", [50, 20, 4])
def test_euler_matches_diffusers(shift, steps):
    ours, ref = FlowEulerScheduler(shift=shift), ref_euler(shift)
    worst, _, _ = run_both(ours, ref, steps)
    assert ours.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert worst <= RTOL


@pytest.mark.parametrize("cls, ref_fn", [(FlowUniPCScheduler, ref_unipc), (FlowEulerScheduler, ref_euler)])
def test_wrong_shift_is_caught(cls, ref_fn):
    # The comparison can fail: a neighbouring shift moves the result far beyond the tolerance.
    _, x_ours, x_ref = run_both(cls(shift=5.0), ref_fn(3.0), 20)
    assert rel_err(x_ours, x_ref) > 1000 * RTOL


@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlowEulerScheduler])
def test_reset_dtype_and_determinism(cls):
    sched = cls(shift=5.0)
    sched.set_timesteps(6)
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    outs = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(2))

    def sample(dtype=torch.float32):
        x = x0.to(dtype)
        for v in outs:
            x = sched.step(v, x)
            assert x.dtype == dtype
        return x

    first = sample()
    with pytest.raises(RuntimeError, match="reset"):
        sched.step(outs[0], first)
    sched.reset()
    assert torch.equal(sample(), first)
    sched.set_timesteps(6)
    assert torch.equal(sample(), first)
    sched.reset()
    assert sample(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlowEulerScheduler])
def test_last_step_lands_on_sigma_zero(cls):
    sched = cls(shift=5.0)
    sched.set_timesteps(4)
    assert sched.sigmas.shape == (5,) and sched.sigmas[-1] == 0
    assert sched.timesteps.shape == (4,)
    assert bool((sched.timesteps[:-1] > sched.timesteps[1:]).all())
    # A model that always predicts the exact velocity noise - x0 ends at x0.
    x0, noise = torch.full((4,), 0.25), torch.randn(4)
    x = noise.clone()
    for _ in sched.timesteps:
        x = sched.step(noise - x0, x)
    torch.testing.assert_close(x, x0)


@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlowEulerScheduler])
@pytest.mark.parametrize("shift", [0, -1.0, float("nan"), float("inf")])
def test_bad_shift(cls, shift):
    with pytest.raises(UserError, match="shift must be a finite number > 0"):
        cls(shift=shift)


@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlowEulerScheduler])
@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_num_steps(cls, steps):
    with pytest.raises(UserError, match=r"num_inference_steps must be an integer >= 1, got"):
        cls().set_timesteps(steps)


def test_step_before_set_timesteps():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        FlowUniPCScheduler().step(torch.zeros(1), torch.zeros(1))


def test_make_scheduler():
    unipc = make_scheduler("unipc", shift=3.0)
    assert isinstance(unipc, FlowUniPCScheduler) and unipc.shift == 3.0
    assert isinstance(make_scheduler(shift=3.0), FlowUniPCScheduler)
    euler = make_scheduler("euler", shift=7.0, num_train_timesteps=500)
    assert isinstance(euler, FlowEulerScheduler) and euler.num_train_timesteps == 500
    with pytest.raises(UserError, match="unknown scheduler 'ddim'; allowed: 'unipc', 'euler'"):
        make_scheduler("ddim", shift=3.0)
    with pytest.raises(UserError, match="shift"):
        make_scheduler("euler", shift=0.0)
