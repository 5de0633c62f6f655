"""Timestep sampling, the sampler grid, loss-weight warmups and LR multipliers."""

import math

import pytest
import torch

from tinyflux.trainer.schedules import (
    constant_with_warmup,
    cosine_schedule,
    flux_shift,
    flux_unshift,
    get_lr_lambda,
    get_lune_weight,
    get_schedule,
    get_sol_weight,
    linear_decay,
    sample_timesteps,
)


def test_flux_shift_closed_form_and_inverse():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(flux_shift(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    torch.testing.assert_close(flux_unshift(flux_shift(t, 3.0), 3.0), t)
    torch.testing.assert_close(flux_shift(flux_unshift(t, 2.5), 2.5), t)
    torch.testing.assert_close(flux_shift(t, 1.0), t)
    assert (flux_shift(t[1:-1], 3.0) > t[1:-1]).all()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("logit_normal", [True, False])
def test_sample_timesteps_range_dtype_and_reproducible(logit_normal):
    kw = dict(device="cpu", logit_normal=logit_normal, min_t=0.01, max_t=0.99)
    t = sample_timesteps(4096, dtype=torch.float64, generator=gen(), **kw)
    assert t.shape == (4096,) and t.dtype == torch.float64
    assert t.min() >= 0.01 and t.max() <= 0.99
    torch.testing.assert_close(t, sample_timesteps(4096, dtype=torch.float64, generator=gen(), **kw))


def test_shift_moves_samples_toward_noise():
    """t = 1 is data: shift > 1 must lower the mean t (more samples near noise), shift 1 leaves it at 0.5."""
    unshifted = sample_timesteps(20000, device="cpu", shift=1.0, generator=gen())
    shifted = sample_timesteps(20000, device="cpu", shift=3.0, generator=gen())
    assert abs(unshifted.mean().item() - 0.5) < 0.01
    assert shifted.mean() < unshifted.mean() - 0.1
    assert (shifted <= unshifted + 1e-6).all()  # same draws: every sample moves toward noise
    uniform = sample_timesteps(20000, device="cpu", shift=3.0, logit_normal=False, generator=gen())
    # uniform sigma shifted by 3: E[sigma'] = int_0^1 3s/(1+2s) ds = 1.5 - 0.75 ln 3
    assert uniform.mean().item() == pytest.approx(1 - (1.5 - 0.75 * math.log(3)), abs=0.01)


def test_sample_timesteps_rejects_bad_range():
    with pytest.raises(ValueError, match="min_t"):
        sample_timesteps(2, device="cpu", min_t=0.9, max_t=0.1)


def test_get_schedule_endpoints_and_shift():
    s = get_schedule(28, shift=3.0)
    assert s.shape == (29,) and s[0] == 0.0 and s[-1] == 1.0
    assert (s.diff() > 0).all()
    torch.testing.assert_close(get_schedule(4, shift=1.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # shift > 1: the first (noisiest) step is smaller than the last
    assert s.diff()[0] < s.diff()[-1]
    torch.testing.assert_close(s[1], 1 - flux_shift(torch.tensor(27 / 28, dtype=torch.float64), 3.0).float())
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0)


def test_expert_weight_warmups():
    assert get_lune_weight(0, 1000, 0.1) == 0.0
    assert get_lune_weight(500, 1000, 0.1) == pytest.approx(0.05)
    assert get_lune_weight(1000, 1000, 0.1) == pytest.approx(0.1)
    assert get_lune_weight(5000, 1000, 0.1) == pytest.approx(0.1)
    assert get_sol_weight(1000, 2000, 0.05) == pytest.approx(0.025)
    assert get_sol_weight(3, 0, 0.05) == pytest.approx(0.05)


def test_cosine_schedule_values():
    f = lambda s: cosine_schedule(s, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    assert cosine_schedule(5, 110, 10, 0.0, warmup_type="cosine") == pytest.approx(0.5)
    assert cosine_schedule(2, 110, 10, 0.0, warmup_type="cosine") == pytest.approx(0.5 * (1 - math.cos(0.2 * math.pi)))


def test_linear_and_constant_values():
    assert linear_decay(10, 110, 10, 0.0) == pytest.approx(1.0)
    assert linear_decay(60, 110, 10, 0.2) == pytest.approx(0.6)
    assert linear_decay(110, 110, 10, 0.2) == pytest.approx(0.2)
    assert constant_with_warmup(3, 4) == pytest.approx(0.75)
    assert constant_with_warmup(100, 4) == 1.0
    assert constant_with_warmup(0, 0) == 1.0


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup_type", ["linear", "cosine"])
def test_lr_lambda_in_unit_interval_with_lambdalr(name, warmup_type):
    fn = get_lr_lambda(name, total_steps=50, warmup_steps=5, min_lr_ratio=0.1, warmup_type=warmup_type)
    values = [fn(s) for s in range(80)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[5] == pytest.approx(1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    for _ in range(7):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * fn(7))


def test_lr_lambda_errors():
    with pytest.raises(ValueError, match="unknown lr_scheduler 'cosin'.*cosine"):
        get_lr_lambda("cosin", 10, 1)
    with pytest.raises(ValueError, match="unknown warmup_type"):
        get_lr_lambda("cosine", 10, 1, warmup_type="exp")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        get_lr_lambda("linear", 10, 1, min_lr_ratio=1.5)
