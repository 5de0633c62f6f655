"""The loader interface the Trainer holds: an EpochLoader's position, saved and restored; the run's loaders fit it."""

from itertools import islice

import pytest
import torch

from tinyflux.trainer.bucket_loader import BucketLoader
from tinyflux.trainer.data import StreamingLoader
from tinyflux.trainer.training_loader import EpochLoader, TrainingLoader

BATCHES = [{"index": torch.tensor([i])} for i in range(5)]


def indices(batches) -> list[int]:
    return [int(b["index"]) for b in batches]


def test_an_epoch_loader_resumes_after_the_batches_it_yielded():
    loader = EpochLoader(BATCHES)
    assert isinstance(loader, TrainingLoader)
    assert indices(islice(loader, 2)) == [0, 1]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_in_epoch": 2, "samples_in_epoch": 0}

    resumed = EpochLoader(BATCHES)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the Trainer's call at the start of every epoch: the same epoch keeps the position
    assert indices(resumed) == [2, 3, 4]
    assert resumed.state_dict() == {"epoch": 1, "batches_in_epoch": 0, "samples_in_epoch": 0}  # the epoch ended
    assert indices(resumed) == [0, 1, 2, 3, 4]


def test_set_epoch_jumps_ahead_only():
    loader = EpochLoader(BATCHES)
    assert indices(islice(loader, 3)) == [0, 1, 2]
    loader.set_epoch(0)
    assert indices(loader) == [3, 4]  # the rest of epoch 0, then epoch 1
    loader.set_epoch(3)
    assert loader.state_dict()["epoch"] == 3 and indices(islice(loader, 1)) == [0]


@pytest.mark.parametrize("cls", [StreamingLoader, BucketLoader])
def test_the_run_loaders_have_what_the_trainer_uses(cls):
    for name in ("__iter__", "set_epoch", "state_dict", "load_state_dict", "close"):
        assert callable(getattr(cls, name, None)), name
