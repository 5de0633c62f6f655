"""Loss functions: the velocity loss with its token weights, min-SNR weights, and the Lune / Sol distillation losses.

Every loss returns a scalar by default; `reduction="none"` returns one value per sample, shape (B,), which the trainer
uses for logging and NaN checks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from tinyflux.trainer.config import LUNE_MODES

REDUCTIONS = ("mean", "none")
SOL_LOSS_TERMS = ("stats", "spatial")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")


def _per_sample_mean(x: Tensor) -> Tensor:
    """(B, ...) -> (B,)"""
    return x.flatten(1).mean(dim=1)


def huber_loss(
    pred: Tensor,
    target: Tensor,
    delta: float = 0.1,
    *,
    smooth: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Huber loss: 0.5 * d^2 where |d| <= delta, delta * (|d| - 0.5 * delta) beyond (quadratic near 0, linear after).

    smooth=True uses the pseudo-Huber delta^2 * (sqrt(1 + (d / delta)^2) - 1) instead, which has the same two regimes
    with a smooth transition. reduction: "mean" (scalar), "none" (elementwise, pred's shape). Computed in float32.
    """
    if delta <= 0:
        raise ValueError(f"huber delta={delta} must be > 0")
    d = pred.float() - target.float()
    if smooth:
        loss = delta**2 * (torch.sqrt(1 + (d / delta) ** 2) - 1)
    else:
        loss = F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=delta)
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")


def _token_grid(num_tokens: int, mask: Tensor | None, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    if grid_size is not None:
        h, w = grid_size
    elif mask is not None:
        h, w = mask.shape[-2:]
    else:
        h = w = math.isqrt(num_tokens)
    if h * w != num_tokens:
        raise ValueError(
            f"token grid {h}x{w} does not hold the {num_tokens} tokens of pred; pass grid_size=(h, w) in tokens "
            f"(latent size / patch size), or a mask of shape (B, h, w)"
        )
    return h, w


def spatial_token_weights(spatial: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Sol map (B, S, S) -> token weights (B, h*w), bilinearly upsampled to the token grid, mean 1 per sample.

    Bilinear (align_corners=False) rather than nearest, so the weights vary smoothly instead of in 8x8 blocks; the map
    is non-negative, so are the weights. Renormalising to mean 1 keeps the loss on the scale of the unweighted one.
    """
    h, w = grid_size
    up = F.interpolate(spatial.float().unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)  # (B, 1, h, w)
    up = rearrange(up, "b 1 h w -> b (h w)")  # (B, N)
    return up / up.mean(dim=1, keepdim=True).clamp_min(1e-12)


def compute_main_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    spatial_weights: Tensor | None = None,
    use_huber: bool = True,
    huber_delta: float = 0.1,
    fg_weight: float = 2.0,
    bg_weight: float = 0.5,
    snr_weights: Tensor | None = None,
    *,
    reduction: str = "mean",
    grid_size: tuple[int, int] | None = None,
) -> Tensor:
    """Velocity loss between pred and target (B, N, C), weighted per token and per sample.

    - Elementwise loss: huber_loss(delta=huber_delta) if use_huber else squared error; averaged over channels.
    - mask (B, h, w) on the token grid (bool, or float in [0, 1] for soft masks): token weight
      bg_weight + (fg_weight - bg_weight) * mask, i.e. fg_weight on foreground, bg_weight on background.
    - spatial_weights (B, S, S), a Sol map: upsampled to the token grid by spatial_token_weights (bilinear, mean 1).
    - Token weights multiply the token losses, which are then averaged over tokens (not divided by the weight sum,
      so a mask re-scales the loss as well as re-balancing it).
    - snr_weights (B,): per-sample multipliers, e.g. min_snr_weight(t).
    The token grid is (h, w) = grid_size, else the mask's shape, else square. Returns a scalar, or (B,) for
    reduction="none". Computed in float32.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be (B, N, C), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if use_huber:
        elem = huber_loss(pred, target, huber_delta, reduction="none")
    else:
        elem = (pred.float() - target.float()).square()
    token_loss = elem.mean(dim=-1)  # (B, N)
    b, n = token_loss.shape
    if mask is not None or spatial_weights is not None:
        grid = _token_grid(n, mask, grid_size)
        if mask is not None:
            if mask.shape != (b, *grid):
                raise ValueError(f"mask must be (B, h, w) = {(b, *grid)} on the token grid, got {tuple(mask.shape)}")
            m = rearrange(mask.float(), "b h w -> b (h w)")  # (B, N)
            token_loss = token_loss * (bg_weight + (fg_weight - bg_weight) * m)
        if spatial_weights is not None:
            token_loss = token_loss * spatial_token_weights(spatial_weights, grid)
    per_sample = token_loss.mean(dim=1)  # (B,)
    if snr_weights is not None:
        if snr_weights.shape != (b,):
            raise ValueError(f"snr_weights must be (B,) = ({b},), got {tuple(snr_weights.shape)}")
        per_sample = per_sample * snr_weights.float()
    return _reduce(per_sample, reduction)


def min_snr_weight(t: Tensor, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma weight for the velocity loss at rectified-flow times t (B,): min(SNR, gamma) / SNR.

    SNR: x_t = t*data + (1-t)*noise has signal-to-noise ratio SNR(t) = (t / (1-t))^2 (0 at noise, inf at data).
    The plain flow-matching loss on v = data - noise is the base objective (what SD3 / Flux train); Min-SNR (Hang et
    al. 2023) only caps the timesteps whose SNR exceeds gamma, where the clean-looking input makes the v target
    (mostly the noise) expensive to fit and little is learned. So the weight is 1 for SNR <= gamma, i.e.
    t <= sqrt(gamma) / (1 + sqrt(gamma)) (0.691 for gamma = 5), and gamma / SNR above it, going to 0 at data. This is
    the eps-prediction form of Min-SNR applied to the v loss, and the rule of the original TinyFlux trainer. It keeps
    the noise-heavy timesteps that the shift asks for at full weight (the v-parameterisation's
    min(SNR, gamma) / (SNR + 1) would weight them by about SNR, i.e. almost 0 near noise, undoing the shift).
    Computed as min(1, gamma * (1-t)^2 / t^2), finite on all of [0, 1]: 1 at t = 0, 0 at t = 1. Returns float32 (B,).
    """
    if gamma <= 0:
        raise ValueError(f"snr gamma={gamma} must be > 0")
    t = t.float()
    capped = gamma * (1 - t).square() / t.square().clamp(min=torch.finfo(torch.float32).tiny)
    return capped.clamp(max=1.0)


def compute_lune_loss(
    pred: Tensor,
    target: Tensor,
    mode: str = "cosine",
    *,
    reduction: str = "mean",
    huber_delta: float = 1.0,
) -> Tensor:
    """Lune distillation loss between predicted and teacher features (B, D).

    mode "cosine": 1 - cosine similarity (direction only: the teacher's feature scale does not matter);
    "mse": mean squared error; "huber": huber_loss with huber_delta. Scalar, or (B,) for reduction="none".
    """
    if pred.shape != target.shape:
        raise ValueError(f"Lune pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p, q = pred.float(), target.float()
    if mode == "cosine":
        per_sample = 1 - F.cosine_similarity(p.flatten(1), q.flatten(1), dim=1, eps=1e-8)
    elif mode == "mse":
        per_sample = _per_sample_mean((p - q).square())
    elif mode == "huber":
        per_sample = _per_sample_mean(huber_loss(p, q, huber_delta, reduction="none"))
    else:
        raise ValueError(f"unknown lune loss mode {mode!r}; choose one of {list(LUNE_MODES)}")
    return _reduce(per_sample, reduction)


def compute_sol_loss(
    pred_stats: Tensor,
    pred_spatial: Tensor,
    target_stats: Tensor,
    target_spatial: Tensor,
    *,
    weights: dict[str, float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Sol distillation loss: MSE on the 4 statistics + MSE on the spatial maps scaled by their cell count.

    The maps (B, S, S) sum to 1, so a cell is about 1 / S^2 (1/64): a plain MSE would be ~1e-4 of the statistics term
    and teach nothing. Multiplying both maps by S^2 expresses them relative to the uniform map (1 = uniform), a scale
    comparable with the statistics in [0, 1]. MSE rather than KL because the predicted map need not be normalised.
    weights: optional {"stats": w, "spatial": w} (both 1 by default). Scalar, or (B,) for reduction="none".
    """
    if pred_stats.shape != target_stats.shape or pred_spatial.shape != target_spatial.shape:
        raise ValueError(
            f"Sol shapes differ: stats {tuple(pred_stats.shape)} vs {tuple(target_stats.shape)}, "
            f"spatial {tuple(pred_spatial.shape)} vs {tuple(target_spatial.shape)}"
        )
    w = {"stats": 1.0, "spatial": 1.0}
    if weights is not None:
        unknown = sorted(set(weights) - set(SOL_LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown Sol loss weight(s) {unknown}; known: {list(SOL_LOSS_TERMS)}")
        w.update(weights)
    cells = pred_spatial.shape[-2] * pred_spatial.shape[-1]
    stats = _per_sample_mean((pred_stats.float() - target_stats.float()).square())
    spatial = _per_sample_mean((cells * (pred_spatial.float() - target_spatial.float())).square())
    return _reduce(w["stats"] * stats + w["spatial"] * spatial, reduction)
