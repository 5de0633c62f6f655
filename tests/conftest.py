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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No process the suite started outlives it: a child still alive here (a launcher a failed test left, a loader
    worker that ignores SIGTERM) could keep the run from ending, so it is named and killed."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            print(f"\nconftest: killing {child.pid} left running by the suite: {' '.join(child.cmdline())[:200]}")
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=10)
