"""Training batches: collate_fn / CachedDataset, and the streaming loader's split, mixing and exact resume."""

from __future__ import annotations

import json
import logging
import multiprocessing
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.fixtures_cache import TINY, make_synthetic_cache
from tinyflux.cache.format import CacheMismatchError
from tinyflux.cache.loaders import CachedDataset, StreamingCacheDataset, collate_fn, make_stream_loader
from tinyflux.cache.memory import DatasetCache
from tinyflux.model.config import TinyFluxConfig


def test_collate_pads_t5_to_the_longest_with_a_mask() -> None:
    cache = make_synthetic_cache(6)
    batch = collate_fn([cache.sample(i) for i in range(6)])
    lengths = cache.encodings.t5_lengths
    assert batch["t5_embeds"].shape == (6, int(lengths.max()), 2, 64) and batch["t5_embeds"].dtype == torch.float32
    assert batch["t5_mask"].sum(1).tolist() == lengths.tolist()
    for b in range(6):
        n = int(lengths[b])
        assert torch.equal(batch["t5_embeds"][b, :n], cache.encodings.t5_embeds[b, :n].float())
        assert not batch["t5_embeds"][b, n:].any()
    assert batch["lune"].shape == (6, 10, TINY.lune_expert_dim) and batch["sol_spatial"].shape == (6, 10, 8, 8)
    assert batch["index"].tolist() == list(range(6)) and batch["t_buckets"].shape == (10,)
    assert collate_fn([cache.sample(0)], pad_to=12)["t5_mask"].shape == (1, 12)


def test_cached_dataset_batches_follow_the_contract() -> None:
    bare = make_synthetic_cache(5, lune=False, sol=False)
    loader = DataLoader(CachedDataset(bare, dataset_id=3), batch_size=4, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert {"latents", "t5_embeds", "t5_mask", "clip_pooled", "index", "dataset_id", "caption", "key"} == set(batch)
    assert batch["dataset_id"].tolist() == [3] * 4 and batch["latents"].shape == (4, 16, 8, 8)
    mixed = collate_fn([make_synthetic_cache(2).sample(0), bare.sample(1)])
    assert mixed["lune_mask"].tolist() == [True, False] and not mixed["lune"][1].any()


def _stream(cache: Path | list[Path], **kw) -> StreamingCacheDataset:  # noqa: ANN003
    defaults = dict(batch_size=4, shuffle_buffer=6, seed=3, rank=0, world_size=1)
    return StreamingCacheDataset(cache, **{**defaults, **kw})


def test_ranks_and_workers_read_disjoint_parts_of_every_epoch(synthetic_shards: Path) -> None:
    def one_pass(epoch: int) -> list[list[str]]:
        parts = []
        for rank in range(2):
            ds = _stream(synthetic_shards, rank=rank, world_size=2, num_workers=2)
            for worker in range(2):
                start = epoch * ds.pass_length
                parts.append([k for b in ds.worker_batches(worker, start) for k in b["key"]])
        return parts

    epoch0, epoch1 = one_pass(0), one_pass(1)
    keys0 = [k for part in epoch0 for k in part]
    assert [len(p) for p in epoch0] == [9, 9, 9, 9]  # 37 samples // 2 ranks // 2 workers
    assert len(set(keys0)) == 36 and set(keys0) <= set(make_synthetic_cache(37).encodings.keys)
    assert len({k for part in epoch1 for k in part}) == 36 and epoch0 != epoch1  # reshuffled, still disjoint


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_stream_continues_with_the_same_samples(synthetic_shards: Path, num_workers: int) -> None:
    def loader():  # noqa: ANN202
        return make_stream_loader(synthetic_shards, batch_size=4, num_workers=num_workers, seed=3, rank=0, world_size=1)

    reference = loader()
    keys = [b["key"] for b in reference] + [b["key"] for b in reference]  # two passes
    assert len({k for batch in keys[: len(reference)] for k in batch}) == 37 - 37 % max(1, num_workers)

    interrupted = loader()
    it = iter(interrupted)
    consumed = [next(it)["key"] for _ in range(7)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    assert consumed == keys[:7]

    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["key"] for b in resumed] + [b["key"] for b in resumed]
    assert rest[: len(keys) - 7] == keys[7:]  # the rest of pass 0, then pass 1, batch for batch


def test_dataloader_workers_take_strict_turns(synthetic_shards: Path) -> None:
    loader = make_stream_loader(synthetic_shards, batch_size=4, num_workers=2, seed=3, rank=0, world_size=1)
    streamed = [b["key"] for b in loader]
    ds = loader.dataset
    by_worker = [[b["key"] for b in ds.worker_batches(w, 0)] for w in range(2)]
    assert streamed == [batch for pair in zip(*by_worker, strict=True) for batch in pair]
    assert len(loader) == len(streamed) == 10


def test_the_workers_live_for_the_whole_run_and_each_pass_ends_on_its_short_batch(synthetic_shards: Path) -> None:
    loader = make_stream_loader(synthetic_shards, batch_size=4, num_workers=2, seed=3, rank=0, world_size=1)
    before = {p.pid for p in multiprocessing.active_children()}
    first = [b["key"] for b in loader]
    workers = {p.pid for p in multiprocessing.active_children()} - before
    second = [b["key"] for b in loader]
    assert len(workers) == 2 and workers <= {p.pid for p in multiprocessing.active_children()}  # no new ones
    ds = loader.dataset
    for epoch, streamed in enumerate([first, second]):
        by_worker = [[b["key"] for b in ds.worker_batches(w, epoch * ds.pass_length)] for w in range(2)]
        assert streamed == [batch for pair in zip(*by_worker, strict=True) for batch in pair]
    assert [len(k) for k in second] == [4] * 8 + [2, 2]  # 18 draws per worker and pass: 4 + 4 + 4 + 4 + 2
    assert loader.epoch == 2
    loader.close()
    assert not workers & {p.pid for p in multiprocessing.active_children()}


def test_mixing_follows_the_weights_and_indices_point_into_each_cache(
    synthetic_shards: Path, synthetic_shards_no_sol: Path
) -> None:
    loader = make_stream_loader(
        [synthetic_shards, synthetic_shards_no_sol], weights=[3, 1], batch_size=8, seed=1, rank=0, world_size=1
    )
    loader.dataset.infinite = True
    caches = [DatasetCache.from_shards(synthetic_shards), DatasetCache.from_shards(synthetic_shards_no_sol)]
    ids, partial = [], 0
    for batch in islice(loader, 60):
        ids += batch["dataset_id"].tolist()
        for b, (i, d) in enumerate(zip(batch["index"].tolist(), batch["dataset_id"].tolist(), strict=True)):
            assert batch["key"][b] == caches[d].encodings.keys[i]
            assert torch.equal(batch["lune"][b], caches[d].lune.features[i].float())
        if "sol_mask" in batch:
            partial += 1
            assert batch["sol_mask"].tolist() == [d == 0 for d in batch["dataset_id"].tolist()]
    share = sum(1 for d in ids if d == 0) / len(ids)
    assert abs(share - 0.75) < 0.06 and partial > 0


def test_a_new_world_size_resumes_at_the_next_pass(synthetic_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    one = make_stream_loader(synthetic_shards, batch_size=4, seed=3, rank=0, world_size=1)
    list(islice(one, 3))
    two = make_stream_loader(synthetic_shards, batch_size=4, seed=3, rank=1, world_size=2)
    with caplog.at_level(logging.WARNING):
        two.load_state_dict(one.state_dict())
    assert "world_size" in caplog.text and two.epoch == 1
    assert two.state_dict()["positions"] == [two.dataset.pass_length]
    other = make_stream_loader([synthetic_shards, synthetic_shards], batch_size=4, rank=0, world_size=1)
    with pytest.raises(ValueError, match="same --cache directories"):
        other.load_state_dict(one.state_dict())


def test_set_epoch_skips_ahead_only(synthetic_shards: Path) -> None:
    loader = make_stream_loader(synthetic_shards, batch_size=4, seed=3, rank=0, world_size=1)
    loader.set_epoch(2)
    assert loader.epoch == 2
    loader.set_epoch(1)
    assert loader.epoch == 2


def test_stream_refuses_a_cache_that_does_not_fit_the_model(synthetic_shards: Path) -> None:
    with pytest.raises(CacheMismatchError, match="t5_layers: cache .* has \\(2, 4\\), the model expects \\(12,\\)"):
        make_stream_loader(synthetic_shards, model_config=TinyFluxConfig.preset("deep"), rank=0, world_size=1)
    make_stream_loader(synthetic_shards, model_config=TINY, rank=0, world_size=1)


def test_the_training_script_streams_batches_in_the_caches_storage_dtype(synthetic_shards: Path) -> None:
    from tinyflux.trainer.config import TrainerConfig
    from tinyflux.trainer.main import build_stream_loader

    cfg = TrainerConfig(batch_size=4, num_workers=0, seed=3, shuffle_buffer=6, verify_shards=True)
    stored = next(iter(build_stream_loader([str(synthetic_shards)], TINY, cfg)))
    wide = next(iter(make_stream_loader(synthetic_shards, batch_size=4, seed=3, shuffle_buffer=6, model_config=TINY)))
    assert stored["latents"].dtype == torch.float16 and wide["latents"].dtype == torch.float32
    assert stored["key"] == wide["key"]
    for name in ("latents", "t5_embeds", "clip_pooled", "lune", "sol_stats", "sol_spatial", "t_buckets"):
        assert torch.equal(stored[name].float(), wide[name]), name  # exact: the cache holds float16 values
