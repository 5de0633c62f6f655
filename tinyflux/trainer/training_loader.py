"""What the Trainer needs of its loader (TrainingLoader), and EpochLoader, which gives a plain loader that interface.

The streaming loader (data.StreamingLoader) and the bucket loader (bucket_loader.BucketLoader) split the data by rank
and keep their own position. A DataLoader over a map-style dataset goes through accelerate's prepare, which shards it
across processes; it and any other iterable of batches (a DataLoader over an IterableDataset that shards itself) are
wrapped in an EpochLoader, which counts what it yields and resumes by skipping that many batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None:
        """Start the batches of `epoch` if the loader is behind it; a no-op otherwise."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Stop any worker processes now (the end of training)."""


class EpochLoader:
    """A TrainingLoader over a loader without a position of its own: accelerate's prepared DataLoader (`accelerator`
    given: it skips with accelerate's skip_first_batches) or any iterable of batches. Its state counts the batches
    and, for a prepared loader, the samples of all processes yielded this epoch: counting samples lets a run resume
    with another number of processes (same global batch) at the same sample (checkpoint.batches_to_skip)."""

    def __init__(self, batches: Iterable[Batch], accelerator: Accelerator | None = None):
        self.batches, self.accelerator = batches, accelerator
        self.epoch = 0
        self.batches_in_epoch = 0  # per process
        self.samples_in_epoch = 0  # all processes; 0 when the global batch is unknown

    @property
    def dataset(self) -> Any:
        return getattr(self.batches, "dataset", None)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the next iteration is the next epoch."""
        global_batch = getattr(self.batches, "total_batch_size", None) if self.accelerator is not None else None
        position = ckpt.TrainingProgress(batches_in_epoch=self.batches_in_epoch, samples_in_epoch=self.samples_in_epoch)
        skip = ckpt.batches_to_skip(position, global_batch)
        batches = self.batches
        if skip and self.accelerator is not None:
            batches = self.accelerator.skip_first_batches(batches, skip)
        elif skip:
            batches = islice(batches, skip, None)
        self.batches_in_epoch = skip
        for batch in batches:
            self.batches_in_epoch += 1
            self.samples_in_epoch += global_batch or 0
            yield batch
        self.epoch, self.batches_in_epoch, self.samples_in_epoch = self.epoch + 1, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch > self.epoch:
            self.epoch, self.batches_in_epoch, self.samples_in_epoch = epoch, 0, 0
        # accelerate's prepared loader reseeds its sampler by epoch; a streaming dataset may reshuffle by it
        for owner in (self.batches, self.dataset):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(self.epoch)
                break

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples_in_epoch": self.samples_in_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_in_epoch, self.samples_in_epoch = int(state["batches_in_epoch"]), int(state["samples_in_epoch"])

    def close(self) -> None:
        pass


def prepare_for_training(
    accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any, loader: Iterable[Batch]
) -> tuple[nn.Module, Any, Any, TrainingLoader]:
    """accelerate's prepare of model, optimizer and scheduler, and the loader as a TrainingLoader: one that keeps its
    own position is used as it is; a DataLoader over a map-style dataset is prepared in the same call (DeepSpeed reads
    the batch size from it) so that accelerate shards it, and wrapped in an EpochLoader like any other iterable."""
    if isinstance(loader, TrainingLoader):
        return (*accelerator.prepare(model, optimizer, scheduler), loader)
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        *prepared, loader = accelerator.prepare(model, optimizer, scheduler, loader)
        return (*prepared, EpochLoader(loader, accelerator))
    return (*accelerator.prepare(model, optimizer, scheduler), EpochLoader(loader))
