"""The student's internal stand-ins for the teachers: the Lune predictor and the Sol prior.

Both read (timestep, pooled text) only, so at inference they run without any teacher. During training the teacher's
cached features may replace their predictions per sample (teacher forcing); the predictions are still returned so
the distillation losses can train them. Exact feature definitions: docs/EXPERT_CACHE.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyflux.model.config import TinyFluxConfig

TIME_FREQ_DIM = 256  # width of the sinusoidal timestep embedding fed to the blocks' time MLP and to both experts


def _mlp(in_dim: int, hidden_dim: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.SiLU()]
    return nn.Sequential(*layers)


def _select(mask: Tensor | None, teacher: Tensor | None, pred: Tensor) -> Tensor:
    """Per sample: the teacher's value where mask is True (all samples when mask is None), else the prediction."""
    if teacher is None:
        return pred
    teacher = teacher.to(pred.dtype)
    if mask is None:
        return teacher
    return torch.where(mask.view(-1, *([1] * (pred.dim() - 1))), teacher, pred)


class LunePredictor(nn.Module):
    """(t, pooled text) -> predicted Lune feature; its gated signal is added to the conditioning vector."""

    def __init__(self, config: TinyFluxConfig):
        super().__init__()
        in_dim = TIME_FREQ_DIM + config.pooled_projection_dim + config.t5_hidden_size
        self.mlp = nn.Sequential(
            _mlp(in_dim, config.lune_hidden_dim), nn.Linear(config.lune_hidden_dim, config.lune_expert_dim)
        )
        self.signal_norm = nn.LayerNorm(config.lune_expert_dim)
        self.signal_proj = nn.Linear(config.lune_expert_dim, config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))  # sigmoid(0) = 0.5: half strength until learned

    def forward(
        self, text_time: Tensor, teacher: Tensor | None = None, teacher_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """text_time: (B, TIME_FREQ_DIM + P + T5). Returns prediction (B, lune_dim) and signal (B, hidden)."""
        pred = self.mlp(text_time)
        feature = _select(teacher_mask, teacher, pred)
        signal = torch.sigmoid(self.gate) * self.signal_proj(self.signal_norm(feature))
        return pred, signal


class SolOut(NamedTuple):
    """What the Sol prior returns. A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors of tuples (for its
    backward hooks that gather parameters) and warns of other types."""

    stats_pred: Tensor  # (B, 4) locality, entropy, clustering, sparsity in [0, 1]
    spatial_pred: Tensor  # (B, S, S), sums to 1
    stats: Tensor  # (B, 4) what the attention uses: the teacher's where forced, else the prediction
    spatial: Tensor  # (B, S, S)


def geometric_sol_prior(t: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Closed-form Sol prior from the noise level sigma = 1 - t alone.

    Near noise attention is diffuse and global, near data local and sharp, so with s = sigma:
      locality = 1 - s/2, entropy = 1/2 + s/2, clustering = 1/2 + s/2, sparsity = 1/2 - s/2 (all in [0, 1]).
    Clustering (docs/EXPERT_CACHE.md) is the overlap of neighbouring queries' attention: diffuse attention overlaps
    (uniform = 1), sharp self-attention does not (identity = 0), so it rises with noise like entropy.
    Spatial map: a centred Gaussian on [-1, 1]^2 with std 0.15 + 0.85 s, normalised to sum 1, so it flattens with noise.
    Returns stats (B, 4) and spatial (B, size, size).
    """
    s = (1 - t.float()).clamp(0, 1)[:, None]  # (B, 1)
    stats = torch.cat([1 - s / 2, 0.5 + s / 2, 0.5 + s / 2, 0.5 - s / 2], dim=1)  # (B, 4)
    coords = torch.linspace(-1, 1, size, device=t.device)
    r2 = coords[:, None] ** 2 + coords[None, :] ** 2  # (S, S)
    std = 0.15 + 0.85 * s[:, :, None]  # (B, 1, 1)
    spatial = torch.exp(-r2 / (2 * std**2))  # (B, S, S)
    return stats, spatial / spatial.sum(dim=(1, 2), keepdim=True)


class SolPrior(nn.Module):
    """(t, pooled text) -> attention statistics and an S x S spatial importance map, blended with a geometric prior.

    The map scales image-token queries and keys per head through a zero-initialised 1x1 conv (identity at init); the
    entropy statistic sets the attention temperature tau = 0.5 + entropy (diffuse attention -> softer logits).
    """

    def __init__(self, config: TinyFluxConfig):
        super().__init__()
        self.size = config.sol_spatial_size
        in_dim = TIME_FREQ_DIM + config.pooled_projection_dim + config.t5_hidden_size
        self.mlp = _mlp(in_dim, config.sol_hidden_dim)
        self.stats_head = nn.Linear(config.sol_hidden_dim, 4)
        self.spatial_head = nn.Linear(config.sol_hidden_dim, self.size**2)
        w = min(max(config.sol_geometric_weight, 1e-4), 1 - 1e-4)
        self.geometric_logit = nn.Parameter(torch.tensor([math.log(w / (1 - w))]))  # sigmoid -> geometric weight
        self.to_heads = nn.Conv2d(1, config.num_attention_heads, kernel_size=1)  # zero-initialised

    def forward(
        self,
        t: Tensor,
        text_time: Tensor,
        teacher_stats: Tensor | None = None,
        teacher_spatial: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> SolOut:
        h = self.mlp(text_time)
        stats_learned = torch.sigmoid(self.stats_head(h))  # (B, 4)
        spatial_learned = self.spatial_head(h).softmax(-1).unflatten(-1, (self.size, self.size))  # (B, S, S)
        stats_geo, spatial_geo = geometric_sol_prior(t, self.size)
        g = torch.sigmoid(self.geometric_logit)
        stats_pred = g * stats_geo.to(h.dtype) + (1 - g) * stats_learned
        spatial_pred = g * spatial_geo.to(h.dtype) + (1 - g) * spatial_learned
        return SolOut(
            stats_pred,
            spatial_pred,
            _select(teacher_mask, teacher_stats, stats_pred),
            _select(teacher_mask, teacher_spatial, spatial_pred),
        )

    def qk_scales(self, out: SolOut, grid: tuple[int, int], txt_len: int) -> tuple[Tensor, Tensor]:
        """Per-head, per-token query/key scales (B, H, L + N, 1); text tokens get 1 (and the temperature on q)."""
        b = out.spatial.shape[0]
        centred = out.spatial[:, None] * self.size**2 - 1  # (B, 1, S, S): 0 where importance is uniform
        per_head = self.to_heads(F.interpolate(centred, size=grid, mode="bilinear", align_corners=False))  # (B,H,h,w)
        img_scale = 1 + per_head.flatten(2)[..., None]  # (B, H, N, 1)
        txt_scale = img_scale.new_ones(b, img_scale.shape[1], txt_len, 1)
        k_scale = torch.cat([txt_scale, img_scale], dim=2)  # (B, H, L + N, 1)
        tau = 0.5 + out.stats[:, 1].clamp(0, 1)  # (B,): entropy in [0, 1] -> temperature in [0.5, 1.5]
        return k_scale / tau.view(b, 1, 1, 1).to(k_scale.dtype), k_scale
