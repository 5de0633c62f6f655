"""Shared pytest fixtures: one_thread here; the zoo's and the caches' in their own plugin modules."""

import pytest
import torch

pytest_plugins = ["tests.fixtures_zoo", "tests.fixtures_cache"]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
