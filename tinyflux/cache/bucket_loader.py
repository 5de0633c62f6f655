"""In-memory training on aspect buckets: every batch one bucket, each sample once per epoch, resumable exactly.

BucketBatchSampler lays out an epoch: each bucket's samples in a seeded permutation, cut into batches of that bucket's
size (the last, partial batch of a bucket is trained as a smaller batch: never dropped, so every sample is seen once
per epoch), all batches then shuffled together. Everything is a pure function of (seed, epoch), so BucketLoader's
state is two integers: the epoch and the batches of it already yielded. Processes take every world_size-th batch of
the epoch's list (ranks may train different buckets in one step); a rank short of a batch at the end repeats one from
the start of the list, as accelerate's even_batches does. Format and flags: docs/CACHE_FORMAT.md, "Aspect buckets".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from tinyflux.cache.buckets import BucketError
from tinyflux.cache.format import CacheFormatError, decode_sample, load_manifest, shard_paths
from tinyflux.util.workers import WorkerInit

BUCKET_BATCH = ("samples", "tokens")  # --bucket_batch: every bucket batch_size samples, or about equal image tokens
_STATE_VERSION = 1


class BucketSamples(Dataset):
    """Every sample of one cache in memory, in manifest order, as the stream yields them (index = manifest position),
    whatever their latent shapes; `shapes[i]` is sample i's latent (height, width)."""

    def __init__(self, cache_dir: str | Path, dataset_id: int = 0):
        manifest = load_manifest(cache_dir)
        t_buckets = torch.tensor(manifest.t_buckets)
        # every process reads every shard (the sampler splits the batches): the plain tar reader, not WebDataset's
        # pipeline, which splits shards by node
        urls = [{"url": str(p)} for p in shard_paths(cache_dir, manifest)]
        self.samples = []
        for index, raw in enumerate(wds.tarfile_samples(urls)):
            sample = decode_sample(raw)
            del sample["meta"]
            self.samples.append({**sample, "index": index, "dataset_id": dataset_id, "t_buckets": t_buckets})
        if len(self.samples) != manifest.num_samples:
            raise CacheFormatError(
                f"{cache_dir}: the shards hold {len(self.samples)} samples, the manifest {manifest.num_samples}"
            )
        self.shapes = [tuple(s["latents"].shape[1:]) for s in self.samples]
        self.resolution = manifest.resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.samples[idx]


def bucket_batch_sizes(
    shapes: Sequence[tuple[int, int]], batch_size: int, mode: str, square_side: int, patch_size: int = 2
) -> dict[tuple[int, int], int]:
    """Batch size per latent shape: `batch_size` each ("samples"), or ("tokens") the most samples whose image tokens
    stay within batch_size x the tokens of the square bucket of latent side `square_side` (at least 1)."""
    if mode not in BUCKET_BATCH:
        raise BucketError(f"--bucket_batch {mode!r}: choose one of {list(BUCKET_BATCH)}")
    budget = batch_size * (square_side // patch_size) ** 2
    sizes = {}
    for h, w in sorted(set(shapes)):
        tokens = (h // patch_size) * (w // patch_size)
        sizes[(h, w)] = batch_size if mode == "samples" else max(1, budget // tokens)
    return sizes


class BucketBatchSampler:
    """An epoch's batches of dataset indices, every batch one latent shape (module docstring)."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        batch_sizes: Mapping[tuple[int, int], int],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.batch_sizes, self.seed, self.rank, self.world_size = dict(batch_sizes), seed, rank, world_size
        self.members: dict[tuple[int, int], np.ndarray] = {}
        for shape in sorted(set(shapes)):
            self.members[shape] = np.array([i for i, s in enumerate(shapes) if s == shape], dtype=np.int64)

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        for shape, members in self.members.items():
            order, size = members[rng.permutation(len(members))], self.batch_sizes[shape]
            out += [order[i : i + size].tolist() for i in range(0, len(order), size)]
        out = [out[i] for i in rng.permutation(len(out))]
        per_rank = -(-len(out) // self.world_size)
        out += out[: per_rank * self.world_size - len(out)]  # the ranks short of a batch repeat the first ones
        return out[self.rank :: self.world_size]

    def __len__(self) -> int:
        total = sum(-(-len(m) // self.batch_sizes[s]) for s, m in self.members.items())
        return -(-total // self.world_size)


class BucketLoader:
    """Batches of a BucketBatchSampler through a DataLoader, knowing how many of the epoch it has yielded
    (state_dict / load_state_dict, saved in the checkpoint as the streaming loader's state is)."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: BucketBatchSampler,
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.position = 0, 0  # the epoch of the next batch, and the batches of it already yielded

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The latent (height, width) of every bucket it batches."""
        return list(self.sampler.members)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; the next iteration is the next epoch."""
        batches = self.sampler.batches(self.epoch)[self.position :]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=WorkerInit(),  # a stop signal to the process group is the main process's to handle
        )
        for batch in loader:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch` if the loader is behind it; a no-op otherwise (the state decides)."""
        if epoch > self.epoch:
            self.epoch, self.position = epoch, 0

    def close(self) -> None:
        """Nothing to stop: each epoch's DataLoader ends with the epoch."""

    def _layout(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "seed": s.seed,
            "world_size": s.world_size,
            "batch_sizes": sorted([*shape, n] for shape, n in s.batch_sizes.items()),
            "num_samples": sum(len(m) for m in s.members.values()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position, "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; with another layout (seed, processes, batch sizes, data), at the start
        of the next epoch, since the interrupted epoch's batches are not the same ones."""
        if state.get("layout") == self._layout():
            self.epoch, self.position = int(state["epoch"]), int(state["position"])
        else:
            self.epoch, self.position = int(state["epoch"]) + (int(state["position"]) > 0), 0
