"""What the Sol teacher measures: four statistics and a spatial map of one self-attention layer.

Pure functions of head-averaged self-attention probabilities `probs` (B, N, N) over a grid of side s, an int for a
square grid (N = s*s) or (h, w) for an aspect bucket's (N = h*w), queries and keys flattened row-major (index =
y * w + x, as diffusers flattens (B, C, H, W) feature maps). Rows are probability distributions. The exact formulas and their known answers are in docs/EXPERT_CACHE.md; the tests check them.

The four statistics (order of `SOL_STAT_NAMES`), each in [0, 1]:
- locality:   1 - E[grid distance query -> key] / max grid distance
- entropy:    mean row entropy / log N
- clustering: mean attention overlap sum_k min(p_q, p_q') of 4-neighbouring queries q, q'
- sparsity:   mean Hoyer sparsity of the rows, (sqrt(N) - |p|_1 / |p|_2) / (sqrt(N) - 1)
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange

SOL_STAT_NAMES: tuple[str, ...] = ("locality", "entropy", "clustering", "sparsity")
Grid = int | tuple[int, int]  # a square grid's side, or (height, width)


def grid_hw(side: Grid) -> tuple[int, int]:
    """(height, width) of a grid given by its side (square) or as (height, width)."""
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


def check_attention(probs: torch.Tensor, side: Grid) -> None:
    """Raise ValueError unless probs is (B, N, N) self-attention over an h x w grid with both sides >= 2."""
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"self-attention probabilities must be (B, N, N), got shape {tuple(probs.shape)}")
    h, w = grid_hw(side)
    if min(h, w) < 2 or probs.shape[-1] != h * w:
        raise ValueError(
            f"attention over N={probs.shape[-1]} tokens does not fit a {h}x{w} grid; the statistics need a grid "
            "with side >= 2 (both sides of an h x w grid)"
        )


def grid_distances(side: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """Euclidean distances between the cells of a grid, (N, N), row-major flattening (shared: read only)."""
    return _grid_distances(grid_hw(side), str(torch.device(device or "cpu")))


@lru_cache(maxsize=16)
def _grid_distances(hw: tuple[int, int], device: str) -> torch.Tensor:
    # Cached: the Sol recorder asks for the same few grids in every layer of every batch (64 MB at SD1.5's 64x64).
    ys, xs = torch.meshgrid(torch.arange(hw[0], device=device), torch.arange(hw[1], device=device), indexing="ij")
    coords = rearrange(torch.stack([ys, xs], dim=-1), "y x c -> (y x) c").float()  # (N, 2)
    # The matmul path of cdist loses precision (non-zero self-distances); the direct path is exact on integer grids.
    return torch.cdist(coords, coords, compute_mode="donot_use_mm_for_euclid_dist")


def attention_locality(probs: torch.Tensor, side: Grid) -> torch.Tensor:
    """1 - mean over queries of the expected query-key grid distance / the grid diagonal, (s-1)*sqrt(2) on a square
    and sqrt((h-1)^2 + (w-1)^2) on an h x w grid; (B,)."""
    check_attention(probs, side)
    dist = grid_distances(side, probs.device)  # (N, N)
    expected = torch.einsum("bqk,qk->bq", probs, dist)  # (B, N)
    h, w = grid_hw(side)
    diagonal = (h - 1) * math.sqrt(2.0) if h == w else math.hypot(h - 1, w - 1)
    return (1.0 - expected.mean(dim=1) / diagonal).clamp(0.0, 1.0)


def attention_entropy(probs: torch.Tensor, side: Grid) -> torch.Tensor:
    """Mean over queries of the row's Shannon entropy, divided by its maximum log N; (B,)."""
    check_attention(probs, side)
    row_entropy = torch.special.entr(probs).sum(dim=-1)  # (B, N); entr(0) = 0
    return (row_entropy.mean(dim=1) / math.log(probs.shape[-1])).clamp(0.0, 1.0)


def attention_clustering(probs: torch.Tensor, side: Grid) -> torch.Tensor:
    """Mean over the 2*s*(s-1) (h*(w-1) + w*(h-1)) pairs of 4-neighbouring queries of sum_k min(p_q[k], p_q'[k]); (B,).

    1 when neighbouring queries attend alike (the image falls into regions that look at the same keys), 0 when their
    attention is disjoint. Unlike entropy it separates one shared focus (all queries on one key: 1) from each query
    looking at itself (0), although both rows are equally peaked.
    """
    check_attention(probs, side)
    h, w = grid_hw(side)
    grid = rearrange(probs, "b (y x) k -> b y x k", y=h)  # (B, h, w, N)
    horizontal = torch.minimum(grid[:, :, :-1], grid[:, :, 1:]).sum(dim=-1)  # (B, s, s-1)
    vertical = torch.minimum(grid[:, :-1], grid[:, 1:]).sum(dim=-1)  # (B, s-1, s)
    overlap = horizontal.sum(dim=(1, 2)) + vertical.sum(dim=(1, 2))
    return (overlap / (h * (w - 1) + w * (h - 1))).clamp(0.0, 1.0)


def attention_sparsity(probs: torch.Tensor, side: Grid) -> torch.Tensor:
    """Mean over queries of the Hoyer sparsity (sqrt(N) - |p|_1 / |p|_2) / (sqrt(N) - 1) of the row; (B,).

    0 for a uniform row, 1 for a one-hot row. It weighs the largest entries (an L2 measure), where entropy weighs all.
    """
    check_attention(probs, side)
    root_n = math.sqrt(probs.shape[-1])
    ratio = probs.sum(dim=-1) / probs.norm(dim=-1).clamp_min(1e-12)  # (B, N)
    return ((root_n - ratio) / (root_n - 1.0)).mean(dim=1).clamp(0.0, 1.0)


def attention_stats(probs: torch.Tensor, side: Grid) -> torch.Tensor:
    """The four statistics of one layer in `SOL_STAT_NAMES` order, (B, 4), computed in float32."""
    probs = probs.float()
    stats = (attention_locality, attention_entropy, attention_clustering, attention_sparsity)
    return torch.stack([stat(probs, side) for stat in stats], dim=-1)  # (B, 4)


def attention_spatial_map(probs: torch.Tensor, side: Grid, size: int) -> torch.Tensor:
    """Attention received per key, on a size x size grid summing to 1; (B, size, size).

    The column mean of probs (how much the average query looks at each key) is laid out on the layer's grid, then
    area-averaged down to size x size, or bilinearly resized when a side of the grid is smaller than that, and
    renormalised. An h x w grid of an aspect bucket is squeezed to the square: cell (i, j) covers rows i*h/size ..
    (i+1)*h/size and columns j*w/size .. (j+1)*w/size of the picture, whatever its aspect.
    """
    check_attention(probs, side)
    h, w = grid_hw(side)
    received = rearrange(probs.float().mean(dim=1), "b (y x) -> b 1 y x", y=h)  # (B, 1, h, w)
    if min(h, w) >= size:
        resized = F.adaptive_avg_pool2d(received, size)
    else:
        resized = F.interpolate(received, size=(size, size), mode="bilinear", align_corners=False)
    resized = resized[:, 0].clamp_min(0.0)  # (B, size, size)
    return resized / resized.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def combine_layers(stats: list[torch.Tensor], maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average per-layer statistics (B, 4) and maps (B, S, S) over layers, every layer weighing the same.

    Returns (stats (B, 4), spatial (B, S, S)) with the spatial map renormalised to sum 1.
    """
    if not stats or len(stats) != len(maps):
        raise ValueError(
            f"need the same, non-zero number of per-layer stats and maps, got {len(stats)} and {len(maps)}"
        )
    spatial = torch.stack(maps).mean(dim=0)  # (B, S, S)
    return torch.stack(stats).mean(dim=0), spatial / spatial.sum(dim=(1, 2), keepdim=True)
