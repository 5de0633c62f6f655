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
    import signal

    import psutil

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for each loader worker killed here
    me = psutil.Process()
    children = me.children(recursive=True)
    for child in children:
        try:
            if child.cmdline() != me.cmdline():  # forked loader workers of a not yet collected iterator go quietly
                print(f"\nconftest: killing {child.pid} left running by the suite: {' '.join(child.cmdline())[:200]}")
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=10)
