"""What the Trainer step does around the model, done in fewer ops: the same numbers as the plain way."""

from __future__ import annotations

import torch

from tinyflux.cache.format import T_BUCKETS
from tinyflux.cache.memory import interpolate_buckets
from tinyflux.trainer.batch import teacher_features


def test_teacher_features_are_interpolated_together_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    batch = {
        "lune": torch.randn(5, 10, 7, generator=g).half(),  # a cache's storage dtype
        "sol_stats": torch.rand(5, 10, 4, generator=g),
        "sol_spatial": torch.rand(5, 10, 8, 8, generator=g),
        "t_buckets": T_BUCKETS,
    }
    t = torch.cat([torch.tensor([0.0, 1.0, float(T_BUCKETS[3])]), torch.rand(2, generator=g)])  # ends, a bucket
    out = teacher_features(batch, t)
    for key, got in (("lune", out.lune), ("sol_stats", out.sol_stats), ("sol_spatial", out.sol_spatial)):
        assert torch.equal(got, interpolate_buckets(batch[key].float(), T_BUCKETS, t)), key
    only_lune = teacher_features(batch, t, sol=False)
    assert torch.equal(only_lune.lune, out.lune) and only_lune.sol_stats is None and only_lune.sol_spatial is None
    only_sol = teacher_features(batch, t, lune=False)
    assert only_sol.lune is None and torch.equal(only_sol.sol_spatial, out.sol_spatial)
