"""Aspect buckets (and caches of several resolutions) in the streaming loader: per-bucket buffers, one shape a batch.

BucketStream is the part of StreamingCacheDataset (tinyflux.cache.loaders) that batches several shapes: a worker's
draws, mixed and shuffled as on square caches, go into the buffer of their shape; a full buffer is a batch, and each
pass ends with its partial buffers as smaller batches. Positions count a worker's items of a pass (its batches, then
empty items up to a bound every worker shares, StreamingCacheDataset.position_pass), so resume replays the pass from
its start. On several processes each rank plans every rank's batches from the shards' bucket_of and repeats its
first ones when short, so all ranks train the same number of batches a pass. Format: docs/CACHE_FORMAT.md,
"Streaming on buckets".
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch

from tinyflux.cache.buckets import BucketError
from tinyflux.frozen.sources import VAE_DOWNSAMPLE


def shape_table(src: Any, shapes: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """Each sample's latent (height, width) by manifest index, from its shard's bucket_of (None for a cache of one
    shape); BucketError (one line) for a cache of several buckets written before build_cache.py listed them."""
    if len(shapes) == 1:
        return None
    buckets = src.manifest.buckets
    if not all("bucket_of" in shard for shard in src.manifest.shards):
        raise BucketError(
            f"{src.cache_dir} does not list its samples' buckets (built before they were): rebuild it into a new "
            "--output to stream it on several processes, or train with --in_memory"
        )
    side = VAE_DOWNSAMPLE
    return [
        (buckets[b]["height"] // side, buckets[b]["width"] // side) for s in src.manifest.shards for b in s["bucket_of"]
    ]


class BucketStream:
    """The bucket batching of StreamingCacheDataset (module docstring); it reads the dataset's layout and streams."""

    # set by StreamingCacheDataset
    bucket_sizes: dict[tuple[int, int], int] | None
    source_shapes: list[list[tuple[int, int]]]
    _shape_tables: list[list[tuple[int, int]] | None]
    per_worker: list[int]
    rank: int
    world_size: int
    infinite: bool

    def _bucket_batches(self, worker: int, position: int, back_to_back: bool) -> Iterator[dict[str, Any]]:
        per_pass = self.position_pass
        while True:
            k, skip = divmod(position, per_pass)
            for item in self._bucket_pass(worker, k, skip):
                position += 1
                item["stream_position"] = torch.tensor([worker, position])
                yield item
            if not (back_to_back or self.infinite):
                return

    def _bucket_pass(self, worker: int, k: int, skip: int) -> Iterator[dict[str, Any]]:
        """The position_pass items of one worker's pass k on buckets, after the first `skip` (read, not decoded).

        Its batches (_bucket_groups), then on several processes as many of its first batches again as another rank
        has batches more in this pass (_repeats: every rank then trains the same number of batches a pass, as
        accelerate's even_batches does), then empty items ({}) up to position_pass."""
        repeats, kept, emitted = self._repeats(worker, k), [], 0
        groups = self._bucket_groups(
            worker, k, self.rank, self._epoch_items, lambda sid, item: self._shape_of(sid, item[1])
        )
        for group in itertools.chain(groups, iter(kept)):
            if len(kept) < repeats:
                kept.append(group)
            emitted += 1
            if emitted > skip:
                yield self._collate([self._decode(sid, *item) for sid, item in group])
        for _ in range(max(emitted, skip), self.position_pass):
            yield {}

    def _bucket_groups(
        self,
        worker: int,
        k: int,
        rank: int,
        items: Callable[[int, int, int], Iterator[tuple[int, Any]]],
        shape_of: Callable[[int, tuple[int, Any]], tuple[int, int]],
    ) -> Iterator[list[tuple[int, tuple[int, Any]]]]:
        """The batches, as [(cache, (index, raw)), ...], of a rank's worker's pass k: its draws (the same ones, mixed
        and shuffled as on square caches) go one by one into the buffer of their shape; a full buffer (its bucket's
        batch size) is a batch. After the last draw each non-empty buffer is a smaller batch, in shape order: buffers
        never cross a pass, so each sample of it is trained once, and a position in the pass is restored by
        replaying the pass from its start. `items(cache, epoch, worker)` reads a cache's epoch as (index, raw);
        `shape_of(cache, (index, raw))` tells a sample's latent shape."""
        n, start = self.pass_length, k * self.pass_length
        streams: dict[int, Iterator[tuple[int, Any]]] = {}
        epochs: dict[int, int] = {}
        for sid, count in enumerate(self._source_counts(worker, start)):
            epochs[sid], done = divmod(count, self.per_worker[sid])
            streams[sid] = items(sid, epochs[sid], worker)
            for _ in islice(streams[sid], done):  # the part of this cache's epoch earlier passes read
                pass

        def take(sid: int) -> tuple[int, Any]:
            item = next(streams[sid], None)
            if item is None:  # this cache's epoch is done: the next one has a new shard order and shuffle
                epochs[sid] += 1
                streams[sid] = items(sid, epochs[sid], worker)
                item = next(streams[sid])
            return item

        sizes = self.bucket_sizes or {}
        buffers: dict[tuple[int, int], list[tuple[int, tuple[int, Any]]]] = {shape: [] for shape in sizes}
        for sid in self.draws(worker, start, n).tolist():
            item = take(sid)
            shape = shape_of(sid, item)
            buffers[shape].append((sid, item))
            if len(buffers[shape]) == sizes[shape]:
                yield buffers[shape]
                buffers[shape] = []
        for buffer in buffers.values():
            if buffer:
                yield buffer

    def _repeats(self, worker: int, k: int) -> int:
        """How many batches this rank's worker repeats in pass k: the most batches any rank's worker trains in it,
        less its own, planned from the samples' shapes in the manifests (shards' bucket_of) without reading."""
        if self.world_size == 1:
            return 0

        def planned(rank: int) -> int:
            def indices(sid: int, epoch: int, w: int) -> Iterator[tuple[int, None]]:
                return self._epoch_indices(sid, epoch, w, rank)

            return sum(1 for _ in self._bucket_groups(worker, k, rank, indices, self._planned_shape))

        counts = [planned(rank) for rank in range(self.world_size)]
        return max(counts) - counts[self.rank]

    def _planned_shape(self, sid: int, item: tuple[int, None]) -> tuple[int, int]:
        table = self._shape_tables[sid]
        return self.source_shapes[sid][0] if table is None else table[item[0]]

    def _shape_of(self, sid: int, raw: dict[str, Any]) -> tuple[int, int]:
        """A raw sample's latent (height, width): its cache's one shape, or what its metadata records."""
        shapes = self.source_shapes[sid]
        if len(shapes) == 1:
            return shapes[0]
        meta = json.loads(raw["json"])
        return int(meta["latent_height"]), int(meta["latent_width"])
