"""The student's internal stand-ins for the teachers: the Lune predictor and the Sol prior, as released in v4.2.

Both read [time embedding, CLIP pooled] only, so at inference they run without any teacher. During training the
teacher's cached features may replace their predictions per sample (teacher forcing); the predictions are still
returned so the distillation losses train them. Feature definitions: docs/EXPERT_CACHE.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tinyflux.model.config import TinyFluxConfig


def _select(mask: Tensor | None, teacher: Tensor | None, pred: Tensor) -> Tensor:
    """Per sample: the teacher's value where mask is True (all samples when mask is None), else the prediction."""
    if teacher is None:
        return pred
    teacher = teacher.to(pred.dtype)
    if mask is None:
        return teacher
    return torch.where(mask.view(-1, *([1] * (pred.dim() - 1))), teacher, pred)


class LunePredictor(nn.Module):
    """[time_emb, pooled] -> predicted Lune feature; signal = sigmoid(expert_gate) * output_proj(feature), added to
    the conditioning vector. The feature is the teacher's where forced, else the prediction."""

    def __init__(self, config: TinyFluxConfig):
        super().__init__()
        hidden, d = config.lune_hidden_dim, config.lune_expert_dim
        self.input_proj = nn.Linear(config.hidden_size + config.pooled_projection_dim, hidden)
        self.predictor = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Dropout(config.lune_predictor_dropout),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, d),
        )
        self.output_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.hidden_size))
        self.expert_gate = nn.Parameter(torch.zeros(1))  # sigmoid(0) = 0.5: half strength until learned

    def forward(
        self, time_pooled: Tensor, teacher: Tensor | None = None, teacher_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """time_pooled (B, hidden + P) -> prediction (B, lune_dim), signal (B, hidden)."""
        pred = self.predictor(self.input_proj(time_pooled))
        feature = _select(teacher_mask, teacher, pred)
        return pred, torch.sigmoid(self.expert_gate) * self.output_proj(feature)


class SolOut(NamedTuple):
    """What the Sol prior returns. A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors of tuples (for its
    backward hooks that gather parameters) and warns of other types."""

    stats_pred: Tensor  # (B, sol_num_stats) predicted statistics, unbounded (the teacher's lie in [0, 1])
    spatial_pred: Tensor  # (B, S, S) predicted map, each cell in (0, 1) (sigmoid)
    temperature: Tensor  # (B, heads) the blend of the geometric and the learned temperature
    spatial: Tensor  # (B, S, S) the blend of the geometric map and the teacher's (or the predicted) map


def geometric_temperature(t: Tensor, num_heads: int) -> Tensor:
    """Closed-form attention temperature: 1 + t plus a head offset in linspace(-0.2, 0.2), clamped to [0.5, 3].

    (B,) -> (B, heads). t = 1 is data, so attention is softest (largest temperature) near the data end.
    """
    offsets = torch.linspace(-0.2, 0.2, num_heads, device=t.device)
    return ((1 + t.float())[:, None] + offsets[None]).clamp(0.5, 3.0)


def geometric_spatial(t: Tensor, size: int) -> Tensor:
    """Closed-form spatial importance: t * 1 + (1 - t) * exp(-2 r), r the distance from the centre of a [-1, 1]^2
    grid of size x size cells; centre-biased at noise (t = 0), uniform at data (t = 1). (B,) -> (B, S, S)."""
    coords = torch.linspace(-1, 1, size, device=t.device)
    centre = torch.exp(-2 * (coords[:, None] ** 2 + coords[None, :] ** 2).sqrt())  # (S, S)
    blend = t.float().view(-1, 1, 1)
    return blend + (1 - blend) * centre


class SolPrior(nn.Module):
    """[time_emb, pooled] -> attention statistics and an S x S spatial map, blended with a geometric prior.

    b = sigmoid(blend_gate) (initialised to sol_geometric_weight): temperature = b * geometric + (1 - b) *
    stat_to_temperature(stats), map = b * geometric + (1 - b) * spatial, where stats / spatial are the teacher's
    where forced, else the predictions. `spatial_to_qk_scale` is part of the released state dict and unused.
    """

    def __init__(self, config: TinyFluxConfig):
        super().__init__()
        self.size, self.num_heads = config.sol_spatial_size, config.num_attention_heads
        self.num_stats = config.sol_num_stats
        in_dim, hidden = config.hidden_size + config.pooled_projection_dim, config.sol_hidden_dim

        def mlp(out_dim: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
            )

        self.stat_predictor = mlp(self.num_stats)
        self.spatial_predictor = mlp(self.size**2)
        self.stat_to_temperature = nn.Sequential(
            nn.Linear(self.num_stats, hidden // 2), nn.SiLU(), nn.Linear(hidden // 2, self.num_heads), nn.Softplus()
        )
        # In the released state dict but never used by the forward: frozen, so no optimizer state or DDP/FSDP
        # gradient bookkeeping is kept for a tensor that never gets a gradient.
        self.spatial_to_qk_scale = nn.Linear(1, self.num_heads).requires_grad_(False)
        w = min(max(config.sol_geometric_weight, 1e-4), 1 - 1e-4)
        self.blend_gate = nn.Parameter(torch.tensor([math.log(w / (1 - w))]))  # sigmoid -> the geometric weight

    def forward(
        self,
        t: Tensor,
        time_pooled: Tensor,
        teacher_stats: Tensor | None = None,
        teacher_spatial: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> SolOut:
        """t (B,) in [0, 1]; time_pooled (B, hidden + P); teacher_stats (B, >= sol_num_stats): the first
        sol_num_stats columns are read (caches hold 4, the released prior reads 3); teacher_spatial (B, S, S)."""
        stats_pred = self.stat_predictor(time_pooled)  # (B, n)
        spatial_pred = torch.sigmoid(self.spatial_predictor(time_pooled)).unflatten(-1, (self.size, self.size))
        if teacher_stats is not None:
            teacher_stats = teacher_stats[:, : self.num_stats]
        stats = _select(teacher_mask, teacher_stats, stats_pred)
        spatial = _select(teacher_mask, teacher_spatial, spatial_pred)
        b = torch.sigmoid(self.blend_gate)
        dtype = stats_pred.dtype
        temperature = b * geometric_temperature(t, self.num_heads).to(dtype) + (1 - b) * self.stat_to_temperature(stats)
        blended = b * geometric_spatial(t, self.size).to(dtype) + (1 - b) * spatial
        return SolOut(stats_pred, spatial_pred, temperature, blended)
