"""Optimizer and learning-rate scheduler factories for TrainerConfig.optimizer / lr_scheduler / warmup_type."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from tinyflux.errors import TinyFluxError
from tinyflux.trainer import schedules
from tinyflux.trainer.config import TrainerConfig

# bitsandbytes keeps tensors smaller than this in 32-bit state (its min_8bit_size default); the probe must be larger.
_BNB_PROBE_NUMEL = 8192
# Devices with torch's fused AdamW kernel.
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps")


class OptimizerUnavailableError(TinyFluxError, RuntimeError):
    """The configured optimizer cannot run in this environment."""


def param_groups(
    params: Iterable[nn.Parameter],
    weight_decay: float,
    lr_scales: Mapping[nn.Parameter, float] | None = None,
    learning_rate: float | None = None,
) -> list[dict]:
    """Decay weight matrices only: biases, norm scales, gates and mixing weights (ndim < 2) are not decayed,
    as in nanoGPT, because shrinking them towards 0 changes what the block computes rather than regularising it.

    lr_scales (a LoRA config's per-pattern lr_scale): parameters listed there get groups of their own whose "lr" is
    learning_rate * scale; the scheduler multiplies every group's own lr, so the ratio holds all run long. The
    unscaled groups come first (the logged lr is theirs)."""
    params = [p for p in params if p.requires_grad]
    lr_scales = lr_scales or {}
    scales = sorted({lr_scales.get(p, 1.0) for p in params} or {1.0}, key=lambda s: (s != 1.0, s))
    groups = []
    for scale in scales:
        for decayed in (True, False):
            members = [p for p in params if lr_scales.get(p, 1.0) == scale and (p.ndim >= 2) == decayed]
            if scale != 1.0 and not members:
                continue
            group = {"params": members, "weight_decay": weight_decay if decayed else 0.0}
            if scale != 1.0:
                group["lr"] = learning_rate * scale
            groups.append(group)
    return groups


def _adamw_8bit(groups: list[dict], config: TrainerConfig, device: torch.device) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library raising on import
        raise OptimizerUnavailableError(
            f"optimizer='adamw_8bit' needs bitsandbytes, which cannot be imported here ({type(e).__name__}: {e}). "
            f"Install it (pip install 'bitsandbytes>=0.43') or use optimizer='adamw'."
        ) from e
    # One real step on a throwaway tensor: bitsandbytes fails only at step time where its kernels lack this device.
    probe = nn.Parameter(torch.zeros(_BNB_PROBE_NUMEL, device=device))
    try:
        probe_opt = bnb.optim.AdamW8bit([probe], lr=1e-3)
        probe.grad = torch.ones_like(probe)
        probe_opt.step()
    except Exception as e:
        raise OptimizerUnavailableError(
            f"optimizer='adamw_8bit': bitsandbytes {getattr(bnb, '__version__', '?')} cannot run its 8-bit AdamW on "
            f"device {device} ({type(e).__name__}: {e}). Use optimizer='adamw', or a bitsandbytes build for this device."
        ) from e
    return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, betas=config.betas)


def build_optimizer(
    params: Iterable[nn.Parameter],
    config: TrainerConfig,
    device: torch.device | str = "cpu",
    lr_scales: Mapping[nn.Parameter, float] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer named by config.optimizer over the trainable params, at config.learning_rate (times the
    parameter's lr_scales entry where it has one)."""
    device = torch.device(device)
    groups = param_groups(params, config.weight_decay, lr_scales, config.learning_rate)
    if config.optimizer == "adamw":
        # The fused kernel is one launch per step instead of several per parameter (on the CPU 4x faster than the
        # single-tensor default, bench/NOTES.md), and it can skip a non-finite step on the device (verdict.py).
        fused = device.type in FUSED_ADAMW_DEVICES
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=fused)
    if config.optimizer == "adamw_8bit":
        return _adamw_8bit(groups, config, device)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # External LR (the schedule below) instead of Adafactor's relative step, so learning_rate means the same
        # step size as for AdamW; no first moment (beta1=None) keeps its memory at O(rows + cols) per matrix.
        return Adafactor(
            groups, lr=config.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False, beta1=None
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (AcceleratedOptimizer.optimizer)."""
    while hasattr(optimizer, "optimizer") and optimizer is not optimizer.optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def clip_in_fused_step(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], max_norm: float | None
) -> Tensor:
    """The gradients' total L2 norm (as clip_grad_norm_ returns it), with the clipping itself left to the next step of
    a fused torch Adam / AdamW: its kernel divides each gradient by the optimizer's `grad_scale` as it reads it (the
    hook GradScaler unscales through), so clipping costs no pass over the gradients of its own. The divisor
    max(1, (norm + 1e-6) / max_norm) is clip_grad_norm_'s factor inverted: the same update to float rounding.
    max_norm None or 0: no clipping, the norm only. For one process or DDP (whole, already reduced gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # foreach where the device has it
    torch_optimizer(optimizer).grad_scale = (norm + 1e-6).div(max_norm).clamp(min=1.0) if max_norm else None
    return norm


def clear_step_scales(optimizer: torch.optim.Optimizer) -> None:
    """Forget the last step's `grad_scale` (clip_in_fused_step) and `found_inf` (the deferred verdict), so that a
    later step outside the Trainer (a user's, a test's) is neither scaled nor skipped by them."""
    inner = torch_optimizer(optimizer)
    for name in ("grad_scale", "found_inf"):
        if hasattr(inner, name):
            delattr(inner, name)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step: lr = learning_rate * multiplier(step) of config.lr_scheduler,
    with config.warmup_type warmup over warmup_steps and decay to min_lr at total_steps."""
    multiplier = schedules.get_lr_lambda(
        config.lr_scheduler,
        total_steps=config.total_steps,
        warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr / config.learning_rate,
        warmup_type=config.warmup_type,
    )
    return LambdaLR(optimizer, multiplier)
