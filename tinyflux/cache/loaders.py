"""Training batches from feature caches: in memory (CachedDataset + collate_fn) or streamed from shards.

A batch is a dict (the contract the trainer reads): "latents" (B, C, H, W), "t5_embeds" (B, L, K, D) zero-padded to the
longest in the batch, "t5_mask" (B, L) bool (True = real token), "clip_pooled" (B, P), "lune" (B, T, lune_dim),
"sol_stats" (B, T, n) (n = len(manifest.sol_stats_names): 4, or 3 in a converted original cache), "sol_spatial"
(B, T, S, S) (absent when the cache has none), "t_buckets" (T,), "index" (B,)
long (the sample's position in its cache), "dataset_id" (B,) long, "caption" and "key" (lists of str). When a batch
mixes caches with and without a teacher, that teacher's rows from caches without it are zero and "lune_mask" /
"sol_mask" (B,) bool mark the real ones.

Streaming (StreamingCacheDataset, driven by StreamingLoader / make_stream_loader) follows docs/CACHE_FORMAT.md:
every rank and DataLoader worker reads its own contiguous slice of each cache's samples per epoch, shuffles it through
a buffer, and mixes caches by weight. Everything is a pure function of (seed, layout, position), so the loader's state
is a few integers per worker and a restored stream yields exactly the samples the interrupted one would have.
StreamingLoader runs one DataLoader for the whole run, its workers streaming pass after pass, so a pass starts without
new worker processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tinyflux.cache.bucket_loader import bucket_batch_sizes
from tinyflux.cache.buckets import manifest_buckets
from tinyflux.cache.format import (
    SAMPLE_TENSORS,
    TEACHER_TENSORS,
    CacheFormatError,
    CacheMismatchError,
    Manifest,
    check_compatible,
    decode_sample,
)
from tinyflux.cache.memory import DatasetCache
from tinyflux.cache.source import CacheLocation, ReadAhead
from tinyflux.cache.stream_buckets import BucketStream, shape_table
from tinyflux.frozen.sources import VAE_DOWNSAMPLE
from tinyflux.model.config import TinyFluxConfig
from tinyflux.util.workers import WorkerInit, stop_signals_blocked

logger = logging.getLogger(__name__)

_MIX_BLOCK = 1024  # mixing draws are generated in seeded blocks, so draw d is computable without the ones before it
_STATE_VERSION = 1


def collate_fn(
    samples: Sequence[dict[str, Any]], pad_to: int | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Samples (CachedDataset / stream items) -> one batch dict (module docstring); T5 states padded with a mask."""
    lengths = [s["t5_embeds"].shape[0] for s in samples]
    width = max(lengths) if pad_to is None else pad_to
    if max(lengths) > width:
        raise ValueError(f"a sample has {max(lengths)} T5 tokens, more than pad_to={pad_to}")
    first = samples[0]["t5_embeds"]
    t5 = torch.zeros(len(samples), width, *first.shape[1:], dtype=dtype)  # (B, L, K, D)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)  # (B, L)
    for b, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        t5[b, :n] = s["t5_embeds"].to(dtype)
        mask[b, :n] = True
    batch: dict[str, Any] = {
        "latents": torch.stack([s["latents"] for s in samples]).to(dtype),  # (B, C, H, W)
        "t5_embeds": t5,
        "t5_mask": mask,
        "clip_pooled": torch.stack([s["clip_pooled"] for s in samples]).to(dtype),  # (B, P)
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
        "dataset_id": torch.tensor([int(s.get("dataset_id", 0)) for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    for teacher, names in TEACHER_TENSORS.items():
        have = [all(n in s for n in names) for s in samples]
        if not any(have):
            continue
        ref = samples[have.index(True)]
        for name in names:
            rows = [s[name] if h else torch.zeros_like(ref[name]) for s, h in zip(samples, have, strict=True)]
            batch[name] = torch.stack(rows).to(dtype)  # (B, T, ...)
        if not all(have):
            batch[f"{teacher}_mask"] = torch.tensor(have, dtype=torch.bool)
    buckets = next((s["t_buckets"] for s in samples if "t_buckets" in s), None)
    if buckets is not None:
        batch["t_buckets"] = buckets.float()  # (T,)
    return batch


class CachedDataset(Dataset):
    """Map-style dataset over an in-memory DatasetCache: sample dicts for collate_fn, tagged with `dataset_id`."""

    def __init__(self, cache: DatasetCache, dataset_id: int = 0):
        self.cache, self.dataset_id = cache, dataset_id

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {**self.cache.sample(idx), "dataset_id": self.dataset_id}


def _rng(*words: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (seed, source, epoch, ...): stable across runs and machines."""
    return np.random.default_rng([int(w) for w in words])


@dataclass
class _Source:
    """One cache (a directory, a URL prefix or a pipe: template) as the stream sees it."""

    cache_dir: str
    manifest: Manifest
    paths: list[str]
    counts: list[int]
    offsets: list[int]  # index of each shard's first sample in manifest order (the sample's "index")
    location: CacheLocation

    @classmethod
    def open(cls, cache_dir: str | Path | CacheLocation) -> _Source:
        location = CacheLocation.of(cache_dir)
        manifest = location.manifest()
        location.check_shards(manifest)  # local: existence and sizes now (a stat each); hashes as read
        paths = [location.url(s["name"]) for s in manifest.shards]
        counts = [int(s["count"]) for s in manifest.shards]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        return cls(location.root, manifest, paths, counts, offsets, location)

    @property
    def fingerprint(self) -> str:
        return f"{self.manifest.feature_hash}:{self.manifest.num_samples}"


def _kept_by_shard(src: _Source, held_out: Sequence[int]) -> list[Sequence[int]]:
    """Per shard, the positions inside it of the samples not held out: a range (fast membership) when it keeps all."""
    out: list[Sequence[int]] = []
    for offset, count in zip(src.offsets, src.counts, strict=True):
        inside = [i - offset for i in held_out if offset <= i < offset + count]
        out.append(range(count) if not inside else sorted(set(range(count)) - set(inside)))
    return out


def _check_sources_agree(sources: list[_Source]) -> None:
    """Caches mixed into one run must agree on every per-sample shape but the latents' height and width (caches of
    other resolutions or aspect buckets are batched shape by shape) and on the timestep buckets."""
    first = sources[0].manifest
    for src in sources[1:]:
        m = src.manifest
        problems = [
            f"{name} {m.fields[name].shape} vs {first.fields[name].shape}"
            for name in SAMPLE_TENSORS
            if name != "latents"  # resolutions mix (a shape a batch); their channels are checked below
            and name in m.fields
            and name in first.fields
            and m.fields[name].shape != first.fields[name].shape
        ]
        if m.latent_shape[0] != first.latent_shape[0]:
            problems.append(f"latent channels {m.latent_shape[0]} vs {first.latent_shape[0]}")
        if m.t5_layers != first.t5_layers:
            problems.append(f"t5_layers {m.t5_layers} vs {first.t5_layers}")
        if m.t_buckets != first.t_buckets:
            problems.append(f"t_buckets {m.t_buckets} vs {first.t_buckets}")
        problems += [f"{name} {a!r} vs {b!r}" for name, a, b in _meaning(m, first) if a != b]
        if problems:
            raise CacheFormatError(
                f"{src.cache_dir} cannot be mixed with {sources[0].cache_dir}: " + "; ".join(problems) + ". "
                "Build every cache of one run with the same --t5_layers and models."
            )


def _meaning(m: Manifest, first: Manifest) -> list[tuple[str, Any, Any]]:
    """What equal shapes do not show: the text regime, the Sol columns, and (for converted original caches, see
    tinyflux.cache.convert) the latent convention and the teachers' timestep pairing."""
    ours = {"latent_convention": "(mode - shift_factor) * scaling_factor", "teacher_timestep": "(1 - t) * 1000"}
    out = [("text_regime", m.text_regime, first.text_regime)]
    if "sol_stats" in m.fields and "sol_stats" in first.fields:
        out.append(("sol_stats_names", m.sol_stats_names, first.sol_stats_names))
    return out + [(k, m.settings.get(k, v), first.settings.get(k, v)) for k, v in ours.items()]


class _VerifiedShards:
    """The (cache, shard) pairs whose sha256 matched, one byte each in shared memory: DataLoader workers live for the
    whole run and see each other's hashes, so each shard is hashed once per run, not once per worker. Set-like."""

    def __init__(self, shard_counts: Sequence[int]):
        self._first = np.concatenate([[0], np.cumsum(shard_counts)]).astype(int).tolist()  # each cache's first flag
        self._flags = torch.zeros(self._first[-1], dtype=torch.uint8).share_memory_()  # pickles as shared memory

    def __contains__(self, key: tuple[int, int]) -> bool:
        return bool(self._flags[self._first[key[0]] + key[1]])

    def add(self, key: tuple[int, int]) -> None:
        self._flags[self._first[key[0]] + key[1]] = 1

    def clear(self) -> None:
        self._flags.zero_()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for flag in self._flags.nonzero().flatten().tolist():
            sid = int(np.searchsorted(self._first, flag, side="right")) - 1
            yield sid, flag - self._first[sid]

    def __eq__(self, other: object) -> bool:
        return set(self) == set(other) if isinstance(other, (set, frozenset, _VerifiedShards)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle-buffer order: fill `size` items, then emit a random one per item read; drain in random order."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class StreamingCacheDataset(BucketStream, IterableDataset):
    """Collated batches streamed from one or more shard sets (cache directories), mixed by `weights`.

    Layout: per cache and epoch, the shards are put in a seeded order; rank r of R takes the contiguous run
    [r * n_r, (r + 1) * n_r) of the samples in that order (n_r = N // R) and logical worker w of W the run
    [w * n_w, (w + 1) * n_w) of it (n_w = n_r // W), so the few leftover samples differ every epoch. Each worker reads
    its run through a shuffle buffer seeded by (seed, cache, epoch, rank, worker). Draw d of worker w picks the cache by
    a uniform seeded by (seed, w, d), the same on every rank, so every rank consumes each cache at the same pace.

    A pass (one finite iteration) is E = sum over caches of n_w draws per worker: one epoch of a single cache.
    `infinite=True` never ends a pass and keeps every batch full. Use it through StreamingLoader (make_stream_loader),
    which tracks what was consumed; a plain DataLoader also works (batch_size=None) but cannot be resumed exactly.
    """

    def __init__(
        self,
        sources: str | Path | CacheLocation | Sequence[str | Path | CacheLocation],
        weights: Sequence[float] | None = None,
        batch_size: int = 8,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        infinite: bool = False,
        pad_to: int | None = None,
        dtype: torch.dtype = torch.float32,
        model_config: TinyFluxConfig | None = None,
        verify_shards: bool = True,
        held_out: Sequence[Sequence[int]] | None = None,
        bucket_batch: str = "samples",
    ):
        dirs = [sources] if isinstance(sources, (str, Path, CacheLocation)) else list(sources)
        if not dirs:
            raise ValueError("no cache directories given")
        weights = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(dirs) or any(w <= 0 for w in weights):
            raise ValueError(f"weights {weights} must be {len(dirs)} positive numbers, one per cache")
        if rank is None or world_size is None:
            env_rank, env_world, _, _ = wds.utils.pytorch_worker_info()
            rank, world_size = env_rank if rank is None else rank, env_world if world_size is None else world_size
        self.sources = [_Source.open(d) for d in dirs]
        _check_sources_agree(self.sources)
        if model_config is not None:
            for src in self.sources:
                check_compatible(src.manifest, model_config, where=f"cache {src.cache_dir}")
        self.weights = weights
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers  # DataLoader worker processes; 0 = the main process, one logical worker
        self.layout_workers = max(1, num_workers)
        self.infinite, self.pad_to, self.dtype = infinite, pad_to, dtype
        self.verify_shards = verify_shards
        self.verified = _VerifiedShards([len(src.paths) for src in self.sources])
        self._hasher: ReadAhead | None = None  # fetches / hashes the next shard while this one is read
        self._hasher_pid = 0  # the process whose thread that is
        # Indices (manifest order) a validation split holds out of each cache: the layout below never streams them.
        self.held_out = [sorted(set(h)) for h in held_out] if held_out else [[] for _ in self.sources]
        if len(self.held_out) != len(self.sources):
            raise ValueError(f"held_out has {len(self.held_out)} index lists for {len(self.sources)} caches")
        self._kept = [_kept_by_shard(src, h) for src, h in zip(self.sources, self.held_out, strict=True)]
        self.sizes = [src.manifest.num_samples - len(h) for src, h in zip(self.sources, self.held_out, strict=True)]
        self.per_worker = [size // world_size // self.layout_workers for size in self.sizes]
        for src, n, size in zip(self.sources, self.per_worker, self.sizes, strict=True):
            if n == 0:
                raise ValueError(
                    f"{src.cache_dir} holds {size} samples to train on: too few for {world_size} process(es) x "
                    f"{self.layout_workers} worker(s). Use fewer DataLoader workers or a bigger cache."
                )
        self._cumulative = np.cumsum(weights) / sum(weights)
        # Latent (height, width) of each cache's buckets (one for a square cache); several across the caches: every
        # batch one shape, through per-bucket buffers (_bucket_batches), `bucket_batch` sizing each bucket's batch.
        self.source_shapes = [
            [
                (b["height"] // VAE_DOWNSAMPLE, b["width"] // VAE_DOWNSAMPLE)
                for b in manifest_buckets(s.manifest)
                if b["count"]
            ]
            for s in self.sources
        ]
        shapes = sorted({shape for per_source in self.source_shapes for shape in per_source})
        self.bucket_sizes: dict[tuple[int, int], int] | None = None
        if len(shapes) > 1:
            square = self.sources[0].manifest.resolution // VAE_DOWNSAMPLE
            patch = model_config.patch_size if model_config is not None else 2
            self.bucket_sizes = bucket_batch_sizes(shapes, batch_size, bucket_batch, square, patch)
        # On several processes: each sample's shape by manifest index (None: the cache has one), to plan every rank's
        # batches (_repeats)
        self._shape_tables: list[list[tuple[int, int]] | None] = [None] * len(self.sources)
        if self.bucket_sizes is not None and world_size > 1:
            self._shape_tables = [
                shape_table(src, shapes) for src, shapes in zip(self.sources, self.source_shapes, strict=True)
            ]
        self.start_positions = [0] * self.layout_workers  # draws (on buckets: items) consumed, per logical worker
        self.start_worker = 0  # logical worker of the next batch (the one DataLoader worker 0 plays)

    @property
    def pass_length(self) -> int:
        """Samples one worker draws per pass."""
        return sum(self.per_worker)

    @property
    def batches_per_pass(self) -> int:
        """Batches a pass yields (on buckets: at most that many; the rest of each worker's items are empty)."""
        if self.bucket_sizes is None:
            return self.layout_workers * -(-self.pass_length // self.batch_size)
        return self.layout_workers * self.position_pass

    @property
    def position_pass(self) -> int:
        """A pass in the units of a worker's position: draws, or on buckets the items each
        worker yields per pass: its batches, then empty items up to a bound every worker shares, so the DataLoader's
        strict turns stay aligned with the passes. Bound: a bucket of c draws fills ceil(c / size) batches, so the
        n draws of a pass fill at most ceil(n / smallest size) + one per bucket."""
        if self.bucket_sizes is None:
            return self.pass_length
        return -(-self.pass_length // min(self.bucket_sizes.values())) + len(self.bucket_sizes)

    @property
    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The latent (height, width) of every shape the stream batches (one for square caches of one resolution)."""
        return list(self.bucket_sizes) if self.bucket_sizes is not None else [self.source_shapes[0][0]]

    def draws(self, worker: int, start: int, count: int) -> np.ndarray:
        """Cache ids of draws [start, start + count) of a logical worker."""
        if len(self.sources) == 1:
            return np.zeros(count, dtype=int)
        first, last = start // _MIX_BLOCK, (start + count - 1) // _MIX_BLOCK
        u = np.concatenate([_rng(self.seed, worker, b, 2).random(_MIX_BLOCK) for b in range(first, last + 1)])
        u = u[start - first * _MIX_BLOCK :][:count]
        return np.searchsorted(self._cumulative, u, side="right").clip(0, len(self.sources) - 1)

    def _source_counts(self, worker: int, position: int) -> list[int]:
        """How many of a worker's first `position` draws went to each cache."""
        if len(self.sources) == 1:
            return [position]
        counts = np.zeros(len(self.sources), dtype=np.int64)
        for start in range(0, position, _MIX_BLOCK):
            ids = self.draws(worker, start, min(_MIX_BLOCK, position - start))
            counts += np.bincount(ids, minlength=len(self.sources))
        return counts.tolist()

    def _epoch_spans(self, sid: int, epoch: int, worker: int, rank: int) -> list[tuple[int, int, int]]:
        """(shard, first, end) of the samples a rank's worker reads of cache `sid` in `epoch`, in order, counting
        kept samples only."""
        src, n, kept = self.sources[sid], self.per_worker[sid], self._kept[sid]
        start = rank * (self.sizes[sid] // self.world_size) + worker * n
        order = _rng(self.seed, sid, epoch, 0).permutation(len(src.paths))

        spans = []  # (shard, first, end) of the samples this worker reads, in order, counting kept samples only
        pos = 0  # position of the current shard's first sample in this epoch's order
        for k in order:
            lo, hi = max(start - pos, 0), min(start + n - pos, len(kept[k]))
            pos += len(kept[k])
            if lo < hi:
                spans.append((int(k), lo, hi))
            if pos >= start + n:
                break
        return spans

    def _epoch_items(self, sid: int, epoch: int, worker: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, raw sample) of this rank's and worker's run of cache `sid` in `epoch`, in shuffle-buffer order."""
        src, kept = self.sources[sid], self._kept[sid]
        spans = self._epoch_spans(sid, epoch, worker, self.rank)

        def run() -> Iterator[tuple[int, dict[str, Any]]]:
            for (k, lo, hi), data in self._verified_ahead(sid, spans):
                samples = src.location.shard_samples(src.manifest.shards[k], data)
                wanted = kept[k][lo:hi]  # positions inside the shard
                members = wanted if isinstance(wanted, range) else set(wanted)
                try:
                    for i, raw in enumerate(islice(samples, wanted[-1] + 1)):
                        if i in members:
                            yield src.offsets[k] + i, raw
                except (tarfile.TarError, OSError) as e:  # unverified (verify_shards=False) and damaged
                    raise CacheFormatError(
                        f"shard {src.paths[k]} cannot be read ({type(e).__name__}: {e}); {src.location.repair()}"
                    ) from e

        rng = _rng(self.seed, sid, epoch, self.rank, worker, 1)
        return _shuffled(run(), self.shuffle_buffer, rng)

    def _epoch_indices(self, sid: int, epoch: int, worker: int, rank: int) -> Iterator[tuple[int, None]]:
        """(index, None) of any rank's run, in the order _epoch_items yields that rank's samples (the shuffle buffer
        draws the same numbers whatever it holds), reading nothing."""
        kept, offsets = self._kept[sid], self.sources[sid].offsets
        spans = self._epoch_spans(sid, epoch, worker, rank)
        indices = ((offsets[k] + i, None) for k, lo, hi in spans for i in kept[k][lo:hi])
        return _shuffled(indices, self.shuffle_buffer, _rng(self.seed, sid, epoch, rank, worker, 1))

    def _verified_ahead(
        self, sid: int, spans: list[tuple[int, int, int]]
    ) -> Iterator[tuple[tuple[int, int, int], bytes | None]]:
        """The spans, each with its shard readied by CacheLocation.fetch_shard: a local shard once it matches its
        manifest sha256 (first open in the run only), a remote one fetched and checked (its sha256 on the first open
        in the run too, its size on every open). The next shard is hashed or fetched in a thread while this one is
        parsed (hashlib and sockets release the GIL), so on a machine with a spare core this costs the reader little.
        Cost: bench/NOTES.md, 2026-12-05 and 2026-12-06."""
        src = self.sources[sid]
        pending: dict[int, Future] = {}

        def start(k: int) -> None:
            verify = self.verify_shards and (sid, k) not in self.verified  # later fetches of a remote one: size only
            if (verify or src.location.remote) and k not in pending:
                if self._hasher is None or self._hasher_pid != os.getpid():  # a forked worker inherits no threads
                    self._hasher = ReadAhead()
                    self._hasher_pid = os.getpid()
                pending[k] = self._hasher.submit(src.location.fetch_shard, src.manifest.shards[k], verify)

        for i, span in enumerate(spans):
            k = span[0]
            start(k)
            if i + 1 < len(spans):
                start(spans[i + 1][0])
            data = None
            if k in pending:
                data = pending.pop(k).result()  # raises the shard's CacheFormatError here, before any of its samples
                if self.verify_shards:
                    self.verified.add((sid, k))
            yield span, data

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_fn(samples, self.pad_to, self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_hasher": None}  # a thread does not pickle into DataLoader workers

    def _decode(self, sid: int, index: int, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            sample = decode_sample(raw)
        except Exception as e:  # missing members, safetensors, JSON or UTF-8 errors of a damaged, unverified shard
            why = str(e) if isinstance(e, CacheFormatError) else f"{type(e).__name__}: {e}"
            raise CacheFormatError(
                f"shard {raw.get('__url__')} cannot be decoded ({why}); {self.sources[sid].location.repair()}"
            ) from e
        sample.pop("meta")
        sample.update(index=index, dataset_id=sid, t_buckets=torch.tensor(self.sources[sid].manifest.t_buckets))
        return sample

    def _pass_end(self, position: int) -> int | None:
        return None if self.infinite else (position // self.position_pass + 1) * self.position_pass

    def worker_batches(self, worker: int, position: int, back_to_back: bool = False) -> Iterator[dict[str, Any]]:
        """Batches of one logical worker from `position` (draws; on buckets, items) to the end of its pass
        (back_to_back: then pass after pass, each still ending on its own short batch, or on buckets its partial
        bucket batches); each carries "stream_position" = (worker, position after it) for StreamingLoader."""
        if self.bucket_sizes is not None:
            return self._bucket_batches(worker, position, back_to_back)
        return self._square_batches(worker, position, back_to_back)

    def _square_batches(self, worker: int, position: int, back_to_back: bool) -> Iterator[dict[str, Any]]:
        end = self._pass_end(position)
        streams: dict[int, Iterator[tuple[int, dict[str, Any]]]] = {}
        epochs: dict[int, int] = {}
        for sid, count in enumerate(self._source_counts(worker, position)):
            epochs[sid], skip = divmod(count, self.per_worker[sid])
            if skip:  # resuming mid-epoch: replay this epoch's order, decoding nothing, up to where it stopped
                streams[sid] = self._epoch_items(sid, epochs[sid], worker)
                for _ in islice(streams[sid], skip):
                    pass

        def take(sid: int) -> dict[str, Any]:
            if sid not in streams:
                streams[sid] = self._epoch_items(sid, epochs[sid], worker)
            item = next(streams[sid], None)
            if item is None:  # this cache's epoch is done: the next one has a new shard order and shuffle
                epochs[sid] += 1
                streams[sid] = self._epoch_items(sid, epochs[sid], worker)
                item = next(streams[sid])
            return self._decode(sid, *item)

        while end is None or position < end:
            size = self.batch_size if end is None else min(self.batch_size, end - position)
            samples = [take(int(sid)) for sid in self.draws(worker, position, size)]
            position += size
            batch = collate_fn(samples, self.pad_to, self.dtype)
            batch["stream_position"] = torch.tensor([worker, position])
            yield batch
            if back_to_back and position == end:
                end = self._pass_end(position)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (b for b in self.worker_stream(back_to_back=False) if b.keys() != {"stream_position"})

    def worker_stream(self, back_to_back: bool) -> Iterator[dict[str, Any]]:
        """What this DataLoader worker (or the main process) yields: its logical worker's batches from start_positions."""
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.layout_workers:
            raise RuntimeError(
                f"StreamingCacheDataset was laid out for {self.layout_workers} DataLoader worker(s) but runs in {workers}: "
                "build it with num_workers= the DataLoader's (make_stream_loader does)"
            )
        # DataLoader worker 0 always yields the first batch; it plays the logical worker whose turn is next
        logical = (physical + self.start_worker) % workers
        yield from self.worker_batches(logical, self.start_positions[logical], back_to_back)


class _BackToBack(IterableDataset):
    """The dataset as StreamingLoader's one DataLoader sees it: every worker streams pass after pass, never ending."""

    def __init__(self, dataset: StreamingCacheDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.dataset.worker_stream(back_to_back=True)


class StreamingLoader:
    """A DataLoader over a StreamingCacheDataset that knows exactly which batches were consumed.

    Iterate it like a DataLoader (one pass per iteration unless infinite). state_dict() holds, per logical worker,
    the draws consumed; DataLoader workers yield batches in strict turn, so after a restore the same batches follow.
    The state is identical on every rank: rank 0's is enough to resume all ranks.

    One DataLoader serves the whole run: its workers stream pass after pass (their batches carry their position, so
    the pass they belong to), and an iteration stops when every logical worker has reached the end of the pass. The
    workers keep reading ahead across the pass boundary, so the next pass's first batch is waiting, not a worker
    start-up away. The DataLoader is built on the first batch and again after set_epoch jumps or load_state_dict
    (its workers hold their start positions); close() shuts its workers down.
    """

    def __init__(self, dataset: StreamingCacheDataset, pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.positions = list(dataset.start_positions)
        self.next_worker = dataset.start_worker
        self._batches: Iterator[dict[str, Any]] | None = None  # the run's DataLoader iterator, at self.positions
        self._peeked: dict[str, Any] | None = None  # on buckets: the batch after the empty items drained (_drain)

    @property
    def epoch(self) -> int:
        """The pass the next batch belongs to."""
        return min(self.positions) // self.dataset.position_pass

    @property
    def at_pass_start(self) -> bool:
        """No batch of the current pass consumed yet."""
        return all(p == self.epoch * self.dataset.position_pass for p in self.positions)

    def __len__(self) -> int:
        if self.dataset.infinite:
            raise TypeError("an infinite stream has no length")
        return self.dataset.batches_per_pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        end = ds._pass_end(min(self.positions))
        while end is None or min(self.positions) < end:
            batch, self._peeked = self._peeked or self._pull(), None
            self._consume(batch)
            if batch:  # on buckets, a worker's pass ends with empty items (StreamingCacheDataset.position_pass)
                if ds.bucket_sizes is not None:
                    self._drain()
                yield batch

    def _pull(self) -> dict[str, Any]:
        try:
            return next(self._start() if self._batches is None else self._batches)
        except BaseException:  # a worker's error leaves the DataLoader out of turn: the next pass starts afresh
            self.close()
            raise

    def _consume(self, batch: dict[str, Any]) -> None:
        worker, position = batch.pop("stream_position").tolist()
        self.positions[worker], self.next_worker = position, (worker + 1) % self.dataset.layout_workers

    def _drain(self) -> None:
        """Consume the empty items that follow a batch, keeping the next real one: after a pass's last batch the
        positions then stand at the pass's end, so the epoch a checkpoint records is the one the run is in."""
        while True:
            item = self._pull()
            if item.keys() != {"stream_position"}:
                self._peeked = item
                return
            self._consume(item)

    def _start(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        ds.start_positions, ds.start_worker = list(self.positions), self.next_worker
        loader = DataLoader(
            _BackToBack(ds),
            batch_size=None,
            num_workers=ds.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if ds.num_workers else None,
            worker_init_fn=WorkerInit(),  # a stop signal to the process group is the main process's to handle
        )
        with stop_signals_blocked():  # the workers start here
            self._batches = iter(loader)
        return self._batches

    @property
    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The latent (height, width) of every shape its batches take (the training grid shows the buckets')."""
        return self.dataset.bucket_shapes

    def close(self) -> None:
        """Shut the DataLoader's workers down now (the next iteration starts new ones where the stream stands)."""
        batches, self._batches, self._peeked = self._batches, None, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator; in-process has none
        if shutdown is not None:
            shutdown()

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of pass `epoch` if the stream is behind it; a no-op otherwise (the state decides)."""
        if epoch > self.epoch:
            self.close()
            self.positions = [epoch * self.dataset.position_pass] * self.dataset.layout_workers
            self.next_worker = 0

    def _layout(self) -> dict[str, Any]:
        ds = self.dataset
        layout = {
            "sources": [s.fingerprint for s in ds.sources],
            "weights": ds.weights,
            "seed": ds.seed,
            "world_size": ds.world_size,
            "num_workers": ds.layout_workers,
            "shuffle_buffer": ds.shuffle_buffer,
        }
        if ds.bucket_sizes is not None:  # only on buckets: the states of square runs stay what they were
            layout["buckets"] = sorted([*shape, n] for shape, n in ds.bucket_sizes.items())
        if any(ds.held_out):  # only then, so that the states of runs without a split still compare equal
            layout["held_out"] = hashlib.sha256(json.dumps(ds.held_out).encode()).hexdigest()
        return layout

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "positions": list(self.positions),
            "next_worker": self.next_worker,
            "epoch": self.epoch,
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off: exactly, when the layout is the same; else at the start of the next pass
        (with another world size or worker count the interrupted pass's remainder is skipped, nothing repeated)."""
        layout, now = state["layout"], self._layout()
        if layout["sources"] != now["sources"]:
            raise CacheMismatchError(
                f"the saved data state is for caches {layout['sources']}, this loader reads {now['sources']} "
                "(feature_hash:num_samples): resume with the same --cache directories, or start a new run"
            )
        self.close()
        if layout == now:
            self.positions, self.next_worker = list(state["positions"]), int(state["next_worker"])
            return
        changed = sorted(k for k in now.keys() | layout.keys() if layout.get(k) != now.get(k))
        old_pass = sum(
            s.manifest.num_samples // layout["world_size"] // layout["num_workers"] for s in self.dataset.sources
        )
        if "buckets" in layout:  # positions counted items: the bound of position_pass under the old layout
            old_pass = -(-old_pass // min(n for _, _, n in layout["buckets"])) + len(layout["buckets"])
        old_epoch = min(state["positions"]) // old_pass
        logger.warning(
            "data stream layout changed (%s): continuing at the start of pass %d, skipping the rest of pass %d",
            ", ".join(changed),
            old_epoch + 1,
            old_epoch,
        )
        self.positions = [(old_epoch + 1) * self.dataset.position_pass] * self.dataset.layout_workers
        self.next_worker = 0


def make_stream_loader(
    cache_dirs: str | Path | CacheLocation | Sequence[str | Path | CacheLocation],
    weights: Sequence[float] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    shuffle_buffer: int = 1000,
    infinite: bool = False,
    model_config: TinyFluxConfig | None = None,
    pin_memory: bool = False,
    pad_to: int | None = None,
    dtype: torch.dtype = torch.float32,
    verify_shards: bool = True,
    held_out: Sequence[Sequence[int]] | None = None,
    bucket_batch: str = "samples",
) -> StreamingLoader:
    """The training stream over cache directories: a StreamingLoader (its .dataset is the StreamingCacheDataset).

    rank / world_size default to the launch environment (RANK / WORLD_SIZE, or torch.distributed). With
    `model_config`, every cache is checked against it first (CacheMismatchError says what differs and how to fix it).
    `held_out`: per cache, the sample indices a validation split keeps out of training. Caches of aspect buckets
    or of several resolutions are batched one shape per batch, `bucket_batch` ("samples" / "tokens") sizing them.
    Do not pass the loader through accelerator.prepare: it already splits the data by rank.
    """
    dataset = StreamingCacheDataset(
        cache_dirs,
        weights,
        batch_size,
        shuffle_buffer,
        seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        infinite=infinite,
        pad_to=pad_to,
        dtype=dtype,
        model_config=model_config,
        verify_shards=verify_shards,
        held_out=held_out,
        bucket_batch=bucket_batch,
    )
    return StreamingLoader(dataset, pin_memory=pin_memory)
