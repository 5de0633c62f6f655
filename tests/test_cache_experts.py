"""In-memory caches: bucket interpolation, safetensors save / load, shards round trip, routing, compatibility check."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures_cache import TINY, make_synthetic_cache
from tinyflux.cache.format import (
    T_BUCKETS,
    CacheFormatError,
    CacheMismatchError,
    check_compatible,
    encode_sample,
    load_manifest,
)
from tinyflux.cache.memory import DatasetCache, MultiSourceCache, interpolate_buckets
from tinyflux.model.config import TinyFluxConfig


def test_interpolation_is_exact_at_buckets_linear_between_and_clamped_outside() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(10, 10, 3, 8, 8, generator=g).half()  # (B, T, ...)
    exact = interpolate_buckets(feats, T_BUCKETS, T_BUCKETS.clone())  # sample b at bucket b
    assert torch.equal(exact, feats.float()[torch.arange(10), torch.arange(10)])

    mid = (T_BUCKETS[:-1] + T_BUCKETS[1:]) / 2  # sample b halfway between buckets b and b+1
    got = interpolate_buckets(feats[:9], T_BUCKETS, mid)
    want = (feats.float()[torch.arange(9), torch.arange(9)] + feats.float()[torch.arange(9), torch.arange(1, 10)]) / 2
    torch.testing.assert_close(got, want)

    quarter = T_BUCKETS[3] + 0.25 * (T_BUCKETS[4] - T_BUCKETS[3])
    got = interpolate_buckets(feats[:1], T_BUCKETS, quarter.view(1))
    torch.testing.assert_close(got[0], 0.75 * feats[0, 3].float() + 0.25 * feats[0, 4].float())

    outside = interpolate_buckets(feats[:2], T_BUCKETS, torch.tensor([0.0, 1.0]))
    assert torch.equal(outside[0], feats[0, 0].float()) and torch.equal(outside[1], feats[1, -1].float())


def test_feature_caches_look_up_rows_and_interpolate() -> None:
    cache = make_synthetic_cache(6)
    idx, t = torch.tensor([4, 1]), torch.tensor([T_BUCKETS[2].item(), 0.5])
    lune = cache.lune.get_features(idx, t)
    assert lune.shape == (2, TINY.lune_expert_dim) and lune.dtype == torch.float32
    assert torch.equal(lune[0], cache.lune.features[4, 2].float())
    torch.testing.assert_close(lune[1], (cache.lune.features[1, 4].float() + cache.lune.features[1, 5].float()) / 2)
    stats, spatial = cache.sol.get_features(idx, t)
    assert stats.shape == (2, 4) and spatial.shape == (2, 8, 8)
    assert torch.equal(spatial[0], cache.sol.spatial[4, 2].float())


def _assert_same_cache(a: DatasetCache, b: DatasetCache) -> None:
    for name in ("latents", "t5_embeds", "t5_lengths", "clip_pooled"):
        assert torch.equal(getattr(a.encodings, name), getattr(b.encodings, name)), name
    assert a.encodings.captions == b.encodings.captions and a.encodings.keys == b.encodings.keys
    assert torch.equal(a.lune.features, b.lune.features)
    assert torch.equal(a.sol.stats, b.sol.stats) and torch.equal(a.sol.spatial, b.sol.spatial)
    assert torch.equal(a.lune.t_buckets, b.lune.t_buckets)


def test_dataset_cache_saves_to_safetensors_and_refuses_pickles(tmp_path: Path) -> None:
    cache = make_synthetic_cache(5)
    cache.save(str(tmp_path / "cache.safetensors"))
    loaded = DatasetCache.load(str(tmp_path / "cache.safetensors"))
    _assert_same_cache(cache, loaded)
    assert loaded.name == "synthetic" and loaded.settings == cache.settings

    (tmp_path / "old.pt").write_bytes(pickle.dumps({"latents": [1, 2]}))
    with pytest.raises(CacheFormatError, match="never unpickles"):
        DatasetCache.load(str(tmp_path / "old.pt"))


def test_dataset_cache_round_trips_through_shards(tmp_path: Path) -> None:
    cache = make_synthetic_cache(11)
    manifest = cache.to_shards(tmp_path, shard_size=4)
    assert [s["count"] for s in manifest.shards] == [4, 4, 3]
    assert manifest.num_samples == 11 and manifest.fields["t5_embeds"].shape == [None, 2, 64]
    assert manifest.fields["latents"].dtype == "float16" and manifest.t5_layers == list(TINY.t5_layers)
    assert load_manifest(tmp_path).feature_hash == manifest.feature_hash
    _assert_same_cache(cache, DatasetCache.from_shards(tmp_path))
    assert manifest.text_regime == "masked" and manifest.latent_shift  # the defaults, unless its settings say

    cache.settings.update(text_regime="padded", latent_shift=False)  # what the deep preset reads (bench caches)
    released = cache.to_shards(tmp_path / "released", shard_size=4)
    assert released.text_regime == "padded" and not released.latent_shift


def test_sample_keys_with_dots_are_refused() -> None:
    with pytest.raises(ValueError, match="extension separator"):
        encode_sample("a.b", "caption", {"latents": torch.zeros(1)}, {})


def test_multi_source_cache_routes_by_dataset_id() -> None:
    full, lune_only, bare = make_synthetic_cache(4, seed=0), make_synthetic_cache(3, seed=1, sol=False), None
    bare = make_synthetic_cache(2, seed=2, lune=False, sol=False)
    multi = MultiSourceCache().add(full, 0).add(lune_only, 5).add(bare, 7)
    idx, ids, t = torch.tensor([2, 1, 0]), torch.tensor([5, 0, 7]), T_BUCKETS[[1, 2, 3]]

    lune = multi.get_lune(idx, ids, t)
    assert torch.equal(lune[0], lune_only.lune.features[2, 1].float())
    assert torch.equal(lune[1], full.lune.features[1, 2].float())
    assert torch.equal(lune[2], torch.zeros(TINY.lune_expert_dim))
    assert multi.lune_available(ids).tolist() == [True, True, False]

    stats, spatial = multi.get_sol(idx, ids, t)
    assert torch.equal(spatial[1], full.sol.spatial[1, 2].float()) and not stats[0].any()
    assert multi.get_lune(torch.tensor([0, 1]), torch.tensor([7, 7]), t[:2]) is None
    assert multi.get_sol(torch.tensor([0]), torch.tensor([5]), t[:1]) == (None, None)
    with pytest.raises(KeyError, match="never added"):
        multi.get_lune(idx, torch.tensor([0, 1, 2]), t)


def test_check_compatible_names_each_mismatch_and_the_fix(tmp_path: Path) -> None:
    manifest = make_synthetic_cache(3).to_shards(tmp_path, shard_size=4)
    check_compatible(manifest, TINY)
    check_compatible(manifest, TINY.replace(use_lune_expert=False, lune_expert_dim=999))  # unused field: no check
    with pytest.raises(CacheMismatchError) as err:
        check_compatible(manifest, TinyFluxConfig())
    message = str(err.value)
    for text in ("t5_layers: the cache has (2, 4), the model expects (0, 4, 8, 12)", "--t5_layers 0 4 8 12"):
        assert text in message
    for name in ("t5_hidden_size", "pooled_projection_dim", "lune_expert_dim"):
        assert f"- {name}: the cache has 64" in message
    assert "model preset built for this cache: tiny" in message
    with pytest.raises(CacheMismatchError, match="in_channels: the cache has 16, the model expects 4"):
        check_compatible(manifest, TINY.replace(in_channels=4))


def test_dataset_cache_build_matches_the_zoo(tiny_zoo, one_thread) -> None:  # noqa: ANN001
    images = [Image.new("RGB", (96, 64), c) for c in ("red", "navy", "olive")]
    prompts = ["a red square", "a navy sky", "an olive field at dusk"]
    cache = DatasetCache.build(tiny_zoo, images, prompts, name="three", resolution=64, batch_size=2)
    assert cache.encodings.latents.shape == (3, 16, 8, 8)
    assert cache.lune.features.shape == (3, 10, TINY.lune_expert_dim) and cache.sol.spatial.shape == (3, 10, 8, 8)
    assert cache.settings["t5_layers"] == list(TINY.t5_layers)
    lune = tiny_zoo.extract_lune(prompts[2:], float(T_BUCKETS[7]), seed=0)
    torch.testing.assert_close(cache.lune.get_features(torch.tensor([2]), T_BUCKETS[7:8]), lune, atol=2e-3, rtol=2e-3)
    t5, _, lengths = tiny_zoo.encode_prompts_batched(prompts[:1], return_lengths=True)
    assert int(cache.encodings.t5_lengths[0]) == int(lengths[0])
    torch.testing.assert_close(cache.encodings[0]["t5_embeds"].float(), t5[0, : lengths[0]], atol=2e-3, rtol=2e-3)
