"""Schedules: training timesteps, the sampler's timestep grid, loss-weight warmups and LR multipliers.

Timesteps follow TinyFlux's convention t = 1 is data, t = 0 is pure noise (x_t = (1-t)*noise + t*data). The Flux /
SD3 shift is defined on the noise level sigma = 1 - t, so that shift > 1 moves samples toward noise, as intended.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

DEFAULT_SHIFT = 3.0  # Flux's shift for 512px-class images; the trainer's and the sampler's default
DEFAULT_NUM_STEPS = 28  # Euler steps of a sample (the sampler's and the training sample grids' default)
DEFAULT_GUIDANCE_SCALE = 5.0  # CFG scale of a sample
WARMUP_TYPES = ("linear", "cosine")
LR_SCHEDULERS = ("cosine", "linear", "constant")


def flux_shift(t: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Flux timestep shift: t' = s*t / (1 + (s-1)*t)

    A monotone map of [0, 1] onto itself that fixes 0 and 1 and, for s > 1, pushes values up (toward 1). Its argument
    is meant to be the noise level sigma = 1 - t (TinyFlux's t = 1 is data): sample_timesteps and get_schedule call it
    on sigma, so that s > 1 spends more steps near noise.
    """
    return shift * t / (1 + (shift - 1) * t)


def flux_unshift(t: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Inverse of flux_shift: t = t' / (s - (s-1)*t')."""
    return t / (shift - (shift - 1) * t)


def sample_timesteps(
    batch_size: int,
    device: str = "cuda",
    shift: float = DEFAULT_SHIFT,
    min_t: float = 1e-4,
    max_t: float = 1 - 1e-4,
    logit_normal: bool = True,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    dtype: torch.dtype = torch.float32,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training timesteps t in [min_t, max_t], shape (batch_size,), t = 1 is data.

    A noise level sigma is drawn from a logit-normal (sigmoid of N(logit_mean, logit_std^2), as SD3) or uniform on
    [0, 1], shifted with sigma' = flux_shift(sigma, shift) (shift > 1 gives more samples near noise), and returned as
    t = 1 - sigma', clamped. `generator` (on `device`) makes the draw reproducible.
    """
    if not 0.0 <= min_t <= max_t <= 1.0:
        raise ValueError(f"need 0 <= min_t <= max_t <= 1, got min_t={min_t}, max_t={max_t}")
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0 (1 = no shift, > 1 = more samples near noise)")
    if logit_normal:
        z = torch.randn(batch_size, device=device, generator=generator, dtype=torch.float32)
        sigma = torch.sigmoid(logit_mean + logit_std * z)
    else:
        sigma = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float32)
    t = 1 - flux_shift(sigma, shift)
    return t.to(dtype).clamp(min_t, max_t)


def get_schedule(num_steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Sampler grid: num_steps + 1 increasing timesteps from exactly 0 (noise) to exactly 1 (data), float32.

    Uniform in sigma = 1 - t before the shift, then sigma' = flux_shift(sigma, shift), so shift > 1 takes more (smaller)
    steps at high noise, matching how sample_timesteps trains.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0")
    sigma = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = 1 - flux_shift(sigma, shift)
    return t.float()


def _linear_warmup(step: int, warmup_steps: int, target_weight: float) -> float:
    if warmup_steps <= 0:
        return float(target_weight)
    return float(target_weight) * min(1.0, max(step, 0) / warmup_steps)


def get_lune_weight(step: int, warmup_steps: int, target_weight: float) -> float:
    """Lune distillation weight: linear from 0 at step 0 to target_weight at warmup_steps, then constant."""
    return _linear_warmup(step, warmup_steps, target_weight)


def get_sol_weight(step: int, warmup_steps: int, target_weight: float) -> float:
    """Sol distillation weight: linear from 0 at step 0 to target_weight at warmup_steps, then constant."""
    return _linear_warmup(step, warmup_steps, target_weight)


def _check_warmup_type(warmup_type: str) -> None:
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"unknown warmup_type {warmup_type!r}; choose one of {list(WARMUP_TYPES)}")


def _warmup_factor(step: int, warmup_steps: int, warmup_type: str) -> float:
    """0 at step 0 rising to 1 at warmup_steps (step / warmup_steps, as diffusers' schedules), linear or half-cosine."""
    _check_warmup_type(warmup_type)
    p = min(1.0, max(step, 0) / warmup_steps)
    return p if warmup_type == "linear" else 0.5 * (1 - math.cos(math.pi * p))


def _decay_progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """Fraction of the post-warmup phase done, in [0, 1]."""
    return min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def _check_ratio(min_lr_ratio: float) -> None:
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must lie in [0, 1] (min_lr / learning_rate)")


def _cosine_decay(q: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * q))


def _linear_decay(q: float) -> float:
    return 1 - q


def _warmup_then_decay(
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    warmup_type: str,
    decay: Callable[[float], float],
) -> float:
    """Warmup 0 -> 1, then 1 -> min_lr_ratio along decay(q), q the fraction of the post-warmup phase done."""
    _check_ratio(min_lr_ratio)
    _check_warmup_type(warmup_type)
    if step < warmup_steps:
        return _warmup_factor(step, warmup_steps, warmup_type)
    return min_lr_ratio + (1 - min_lr_ratio) * decay(_decay_progress(step, total_steps, warmup_steps))


def cosine_schedule(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, warmup_type: str = "linear"
) -> float:
    """LR multiplier: warmup 0 -> 1 over warmup_steps, then half-cosine 1 -> min_lr_ratio at total_steps (held after)."""
    return _warmup_then_decay(step, total_steps, warmup_steps, min_lr_ratio, warmup_type, _cosine_decay)


def linear_decay(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, warmup_type: str = "linear"
) -> float:
    """LR multiplier: warmup 0 -> 1 over warmup_steps, then linear 1 -> min_lr_ratio at total_steps (held after)."""
    return _warmup_then_decay(step, total_steps, warmup_steps, min_lr_ratio, warmup_type, _linear_decay)


def constant_with_warmup(step: int, warmup_steps: int, warmup_type: str = "linear") -> float:
    """LR multiplier: warmup 0 -> 1 over warmup_steps, then 1."""
    _check_warmup_type(warmup_type)
    if step < warmup_steps:
        return _warmup_factor(step, warmup_steps, warmup_type)
    return 1.0


def get_lr_lambda(
    name: str,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    warmup_type: str = "linear",
) -> Callable[[int], float]:
    """The LR multiplier `step -> float in [0, 1]` for torch.optim.lr_scheduler.LambdaLR.

    name: "cosine", "linear" (decay) or "constant" (with warmup; min_lr_ratio unused). Raises ValueError on an unknown
    name or warmup_type, or a min_lr_ratio outside [0, 1].
    """
    _check_ratio(min_lr_ratio)
    _check_warmup_type(warmup_type)
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} must be >= 0")
    if name == "cosine":
        return lambda step: cosine_schedule(step, total_steps, warmup_steps, min_lr_ratio, warmup_type)
    if name == "linear":
        return lambda step: linear_decay(step, total_steps, warmup_steps, min_lr_ratio, warmup_type)
    if name == "constant":
        return lambda step: constant_with_warmup(step, warmup_steps, warmup_type)
    raise ValueError(f"unknown lr_scheduler {name!r}; choose one of {list(LR_SCHEDULERS)}")
