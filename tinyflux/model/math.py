"""Pure tensor math of the student: timestep embedding, 3-axis RoPE, attention. Testable against closed forms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by time_factor, as Flux does). (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = time_factor * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope(ids: Tensor, axes_dims: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """Rotary angles for positions ids (B, N, n_axes): each axis a gets axes_dims[a] / 2 frequencies.

    Returns cos, sin of shape (B, 1, N, head_dim / 2), broadcastable over heads.
    """
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=ids.device, dtype=torch.float64) / dim)  # (dim/2,)
        angles.append(ids[..., axis].double()[..., None] * freqs)  # (B, N, dim/2)
    angle = torch.cat(angles, dim=-1).float().unsqueeze(1)  # (B, 1, N, head_dim/2)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, H, N, D) by the angles behind cos/sin (B, 1, N, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, N, D/2, 2)
    x0, x1 = pairs.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, H, N, D/2, 2)
    return out.flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention over heads. q, k, v: (B, H, N, D); mask: bool (B, 1, 1, N) keys to keep.

    Returns (B, N, H * D).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D)
    return out.transpose(1, 2).flatten(2)  # (B, N, H*D)
