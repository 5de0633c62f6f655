"""Sol statistics and spatial map on hand-built attention maps whose answers are known (docs/EXPERT_CACHE.md)."""

from __future__ import annotations

import math

import pytest
import torch

from tinyflux.frozen.sol_stats import (
    SOL_STAT_NAMES,
    attention_spatial_map,
    attention_stats,
    combine_layers,
    grid_distances,
)

LOCALITY, ENTROPY, CLUSTERING, SPARSITY = range(4)


def uniform(side: int) -> torch.Tensor:
    n = side * side
    return torch.full((1, n, n), 1.0 / n)


def identity(side: int) -> torch.Tensor:
    return torch.eye(side * side)[None]


def sink(side: int, key: int = 0) -> torch.Tensor:
    """Every query attends only to one key."""
    probs = torch.zeros(1, side * side, side * side)
    probs[:, :, key] = 1.0
    return probs


def block_windows(side: int, window: int) -> torch.Tensor:
    """Each query attends uniformly to the window x window block it lies in (non-overlapping local windows)."""
    block = torch.arange(side) // window
    block_id = (block[:, None] * side + block[None, :]).flatten()  # (N,) block of each cell
    same = (block_id[:, None] == block_id[None, :]).float()
    return (same / same.sum(dim=1, keepdim=True))[None]


def test_stat_names_fix_the_order() -> None:
    assert SOL_STAT_NAMES == ("locality", "entropy", "clustering", "sparsity")


def test_grid_distances_are_exact() -> None:
    dist = grid_distances(3)
    assert dist.shape == (9, 9)
    assert torch.equal(dist.diagonal(), torch.zeros(9))
    assert dist[0, 8].item() == pytest.approx(2 * math.sqrt(2))  # (0,0) -> (2,2)
    assert dist[1, 7].item() == pytest.approx(2.0)  # (0,1) -> (2,1)


def test_uniform_attention() -> None:
    stats = attention_stats(uniform(2), side=2)[0]
    # On a 2x2 grid every query is 0, 1, 1 and sqrt(2) away from the four keys; the diagonal is sqrt(2).
    assert stats[LOCALITY].item() == pytest.approx(1 - (2 + math.sqrt(2)) / 4 / math.sqrt(2), abs=1e-6)
    assert stats[ENTROPY].item() == pytest.approx(1.0, abs=1e-6)
    assert stats[CLUSTERING].item() == pytest.approx(1.0, abs=1e-6)
    assert stats[SPARSITY].item() == pytest.approx(0.0, abs=1e-6)


def test_one_hot_self_attention() -> None:
    stats = attention_stats(identity(4), side=4)[0]
    assert stats.tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)


def test_local_window_attention() -> None:
    stats = attention_stats(block_windows(side=6, window=2), side=6)[0]
    # Within a 2x2 block the mean distance is (0 + 1 + 1 + sqrt 2) / 4; the 6x6 diagonal is 5 sqrt 2.
    assert stats[LOCALITY].item() == pytest.approx(1 - (2 + math.sqrt(2)) / 4 / (5 * math.sqrt(2)), abs=1e-6)
    assert stats[ENTROPY].item() == pytest.approx(math.log(4) / math.log(36), abs=1e-6)
    # 60 neighbouring pairs on a 6x6 grid, 36 of them inside a block (overlap 1), 24 across blocks (overlap 0).
    assert stats[CLUSTERING].item() == pytest.approx(36 / 60, abs=1e-6)
    # Hoyer of 4 equal entries among 36: (6 - 2) / (6 - 1).
    assert stats[SPARSITY].item() == pytest.approx(0.8, abs=1e-6)


def test_shared_focus_separates_clustering_from_entropy_and_sparsity() -> None:
    """All queries on one key: as peaked as self attention (entropy 0, sparsity 1) but fully shared (clustering 1)."""
    stats = attention_stats(sink(2), side=2)[0]
    assert stats.tolist() == pytest.approx([1 - (2 + math.sqrt(2)) / 4 / math.sqrt(2), 0.0, 1.0, 1.0], abs=1e-6)


def test_no_statistic_copies_or_mirrors_another() -> None:
    """The original's clustering was 1 - entropy and its sparsity a copy of locality; across the known maps each pair
    of ours differs somewhere, and so does each statistic from the complement of another."""
    maps = [(uniform(4), 4), (identity(4), 4), (sink(4), 4), (block_windows(4, 2), 4), (block_windows(6, 2), 6)]
    table = torch.cat([attention_stats(p, side) for p, side in maps])  # (maps, 4)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert not torch.allclose(table[:, i], table[:, j], atol=1e-3), (SOL_STAT_NAMES[i], SOL_STAT_NAMES[j])
            assert not torch.allclose(table[:, i], 1 - table[:, j], atol=1e-3), (SOL_STAT_NAMES[i], SOL_STAT_NAMES[j])


def test_stats_of_random_attention_lie_in_unit_interval() -> None:
    generator = torch.Generator().manual_seed(0)
    for side, temperature in [(2, 0.1), (5, 1.0), (8, 10.0)]:
        logits = torch.randn(3, side * side, side * side, generator=generator) * temperature
        stats = attention_stats(logits.softmax(dim=-1), side)
        assert stats.shape == (3, 4)
        assert ((stats >= 0) & (stats <= 1)).all()


def test_spatial_map_of_uniform_and_self_attention_is_flat() -> None:
    for probs in (uniform(16), identity(16)):
        spatial = attention_spatial_map(probs, side=16, size=8)
        assert spatial.shape == (1, 8, 8)
        assert torch.allclose(spatial, torch.full_like(spatial, 1 / 64), atol=1e-7)


def test_spatial_map_pools_received_attention_into_its_cell() -> None:
    key = 5 * 16 + 11  # cell (y=5, x=11) of a 16x16 grid falls in cell (2, 5) of the 8x8 map
    spatial = attention_spatial_map(sink(16, key), side=16, size=8)[0]
    assert spatial[2, 5].item() == pytest.approx(1.0)
    assert spatial.sum().item() == pytest.approx(1.0)


def test_spatial_map_upsamples_small_grids() -> None:
    spatial = attention_spatial_map(sink(4, key=0), side=4, size=8)[0]  # a 4x4 grid, all attention on its corner
    assert spatial.sum().item() == pytest.approx(1.0)
    assert spatial[0, 0] == spatial.max()
    assert spatial[7, 7].item() == pytest.approx(0.0)
    flat = attention_spatial_map(uniform(2), side=2, size=8)
    assert torch.allclose(flat, torch.full_like(flat, 1 / 64))


def test_combine_layers_weighs_layers_equally() -> None:
    stats = [torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])]
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1.0
    flat = torch.full((1, 8, 8), 1 / 64)
    mean_stats, spatial = combine_layers(stats, [corner, flat])
    assert mean_stats.tolist() == [[0.5, 0.5, 0.5, 0.5]]
    assert spatial[0, 0, 0].item() == pytest.approx(0.5 + 0.5 / 64)
    assert spatial.sum().item() == pytest.approx(1.0)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit a 3x3 grid"):
        attention_stats(uniform(2), side=3)
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        attention_stats(torch.ones(4, 4), side=2)
    with pytest.raises(ValueError, match="side >= 2"):
        attention_stats(torch.ones(1, 1, 1), side=1)
