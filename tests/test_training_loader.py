"""The loader interface the Trainer holds: where an EpochLoader resumes; the run's loaders fit the interface."""

import pytest
import torch

from tinyflux.cache.bucket_loader import BucketLoader
from tinyflux.cache.loaders import StreamingLoader
from tinyflux.trainer.checkpoint import TrainingProgress
from tinyflux.trainer.training_loader import EpochLoader, TrainingLoader

BATCHES = [{"index": torch.tensor([i])} for i in range(5)]


def indices(batches) -> list[int]:
    return [int(b["index"]) for b in batches]


def test_an_epoch_loader_resumes_where_the_progress_stands():
    progress = TrainingProgress()
    loader = EpochLoader(BATCHES, lambda: progress)
    assert isinstance(loader, TrainingLoader)
    assert indices(loader) == [0, 1, 2, 3, 4] and loader.state_dict() == {}
    progress.batches_in_epoch = 2  # the Trainer counts the batches it consumed; a checkpoint restores the count
    assert indices(loader) == [2, 3, 4]
    progress.epoch, progress.batches_in_epoch = 3, 0
    assert loader.epoch == 3 and indices(loader) == [0, 1, 2, 3, 4]


def test_an_epoch_loader_skips_in_samples_when_it_knows_the_global_batch():
    class Prepared(list):  # what EpochLoader reads of accelerate's prepared loader
        total_batch_size = 4

    class Accelerator:
        def skip_first_batches(self, batches, skip):
            return batches[skip:]

    progress = TrainingProgress(batches_in_epoch=1, samples_in_epoch=8)  # one batch of 8 read with another layout
    assert indices(EpochLoader(Prepared(BATCHES), lambda: progress, Accelerator())) == [2, 3, 4]


@pytest.mark.parametrize("cls", [StreamingLoader, BucketLoader])
def test_the_run_loaders_have_what_the_trainer_uses(cls):
    for name in ("__iter__", "set_epoch", "state_dict", "load_state_dict", "close"):
        assert callable(getattr(cls, name, None)), name
