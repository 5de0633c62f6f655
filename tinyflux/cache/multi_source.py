"""MultiSourceCache: teacher-feature lookups of a batch mixed from several datasets, routed by dataset id.

Each dataset's DatasetCache (tinyflux.cache.memory) answers for its own rows; rows of datasets without Lune or
Sol features get zeros, and lune_available / sol_available tell them apart.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TeacherFeatures(Protocol):
    """What MultiSourceCache reads of a dataset's cache (cache_experts.DatasetCache): its Lune and Sol feature
    caches (LuneFeatureCache / SolFeatureCache, each with get_features(indices, t)), None where it has none."""

    lune: Any
    sol: Any


class MultiSourceCache:
    """Routes feature lookups by dataset id to the DatasetCache registered under it."""

    def __init__(self):
        self.caches: dict[int, TeacherFeatures] = {}

    def add(self, cache: TeacherFeatures, dataset_id: int) -> MultiSourceCache:
        self.caches[int(dataset_id)] = cache
        return self

    def _check_ids(self, dataset_ids: torch.Tensor) -> list[int]:
        ids = [int(i) for i in dataset_ids.tolist()]
        unknown = sorted(set(ids) - set(self.caches))
        if unknown:
            raise KeyError(
                f"dataset ids {unknown} were never added; known: {sorted(self.caches)} (use .add(cache, id))"
            )
        return ids

    def lune_available(self, dataset_ids: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whose dataset has Lune features (rows without get zeros from get_lune)."""
        return torch.tensor([self.caches[i].lune is not None for i in self._check_ids(dataset_ids)], dtype=torch.bool)

    def sol_available(self, dataset_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.caches[i].sol is not None for i in self._check_ids(dataset_ids)], dtype=torch.bool)

    def get_lune(
        self, local_indices: torch.Tensor, dataset_ids: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor | None:
        """(B, lune_dim) float32 at the timesteps; None when no row's dataset has Lune features; rows of datasets
        without them are zero (lune_available tells them apart)."""
        ids, out = self._check_ids(dataset_ids), None
        for dataset_id in sorted(set(ids)):
            lune = self.caches[dataset_id].lune
            if lune is None:
                continue
            rows = torch.tensor([b for b, i in enumerate(ids) if i == dataset_id])
            feats = lune.get_features(local_indices.cpu()[rows], timesteps.cpu()[rows])  # (b, D)
            out = torch.zeros(len(ids), feats.shape[-1]) if out is None else out
            out[rows] = feats
        return out

    def get_sol(
        self, local_indices: torch.Tensor, dataset_ids: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(stats (B, 4), spatial (B, S, S)) float32, or (None, None) when no row's dataset has Sol features."""
        ids, stats, spatial = self._check_ids(dataset_ids), None, None
        for dataset_id in sorted(set(ids)):
            sol = self.caches[dataset_id].sol
            if sol is None:
                continue
            rows = torch.tensor([b for b, i in enumerate(ids) if i == dataset_id])
            s, m = sol.get_features(local_indices.cpu()[rows], timesteps.cpu()[rows])
            if stats is None:
                stats, spatial = torch.zeros(len(ids), *s.shape[1:]), torch.zeros(len(ids), *m.shape[1:])
            stats[rows], spatial[rows] = s, m
        return stats, spatial
