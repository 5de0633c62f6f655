"""What the Trainer needs of its loader (TrainingLoader), and EpochLoader, which gives a plain loader that interface.

The streaming loader (data.StreamingLoader) and the bucket loader (bucket_loader.BucketLoader) split the data by rank
and keep their own position. A DataLoader over a map-style dataset goes through accelerate's prepare, which shards it
across processes; it and any other iterable of batches (a DataLoader over an IterableDataset that shards itself) are
wrapped in an EpochLoader, whose position is the run's progress: it resumes by skipping the batches that counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Protocol, runtime_checkable

from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from tinyflux.trainer import checkpoint as ckpt

Batch = dict[str, Any]


@runtime_checkable
class TrainingLoader(Protocol):
    """Batches of one epoch per iteration, with a position a checkpoint saves and restores."""

    epoch: int  # the epoch the next batch belongs to
    # (height, width) in pixels of the batches' shapes where they vary (aspect buckets, caches of several
    # resolutions): the sample grid shows each aspect; empty where every batch has the cache's one shape
    bucket_shapes: list[tuple[int, int]]

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None:
        """Start the batches of `epoch` if the loader is behind it; a no-op otherwise."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Stop any worker processes now (the end of training)."""


class EpochLoader:
    """A TrainingLoader over a loader without a position of its own: accelerate's prepared DataLoader (`accelerator`
    given: it skips with accelerate's skip_first_batches) or any iterable of batches. Its position is the run's
    progress (`progress()`: the batches and samples of the epoch consumed, which every checkpoint holds), so its
    state_dict is empty; each iteration skips what the progress counts (checkpoint.batches_to_skip: in samples where
    the global batch is known, so a run resumes with another number of processes at the same sample)."""

    def __init__(
        self,
        batches: Iterable[Batch],
        progress: Callable[[], ckpt.TrainingProgress],
        accelerator: Accelerator | None = None,
    ):
        self.batches, self.progress, self.accelerator = batches, progress, accelerator

    @property
    def epoch(self) -> int:
        return self.progress().epoch

    @property
    def dataset(self) -> Any:
        return getattr(self.batches, "dataset", None)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def bucket_shapes(self) -> list[tuple[int, int]]:
        return []  # one shape: a plain DataLoader over one cache's square samples

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch."""
        global_batch = getattr(self.batches, "total_batch_size", None) if self.accelerator is not None else None
        skip = ckpt.batches_to_skip(self.progress(), global_batch)
        if skip and self.accelerator is not None:
            return iter(self.accelerator.skip_first_batches(self.batches, skip))
        return islice(self.batches, skip, None) if skip else iter(self.batches)

    def set_epoch(self, epoch: int) -> None:
        # accelerate's prepared loader reseeds its sampler by epoch; a streaming dataset may reshuffle by it
        for owner in (self.batches, self.dataset):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
                break

    def state_dict(self) -> dict[str, Any]:
        return {}  # the position is the progress's

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the progress a checkpoint restores is the position."""

    def close(self) -> None:
        """Nothing to stop: a DataLoader's workers end with its epoch."""


def prepare_for_training(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    loader: Iterable[Batch],
    progress: Callable[[], ckpt.TrainingProgress],
) -> tuple[nn.Module, Any, Any, TrainingLoader]:
    """accelerate's prepare of model, optimizer and scheduler, and the loader as a TrainingLoader: one that keeps its
    own position is used as it is; a DataLoader over a map-style dataset is prepared in the same call (DeepSpeed reads
    the batch size from it) so that accelerate shards it, and wrapped in an EpochLoader on `progress` like any other
    iterable."""
    if isinstance(loader, TrainingLoader):
        return (*accelerator.prepare(model, optimizer, scheduler), loader)
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        *prepared, loader = accelerator.prepare(model, optimizer, scheduler, loader)
        return (*prepared, EpochLoader(loader, progress, accelerator))
    return (*accelerator.prepare(model, optimizer, scheduler), EpochLoader(loader, progress))
