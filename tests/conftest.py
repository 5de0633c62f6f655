"""Shared pytest fixtures: one_thread here; the zoo's and the caches' in their own plugin modules. Under
pytest-xdist (`make test` runs two workers), each worker keeps one intra-op thread, and the files that take longest
start first, so that the two workers finish together."""

import os

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


# The files that run longest (SLURM jobs, multi-process launches, signals): first, so no worker ends the run alone
# with one of them. Measured with --durations on the 2-core machine (2026-12-06).
LONGEST_FIRST = (
    "test_slurm.py",
    "test_signals.py",
    "test_static_shapes.py",
    "test_scale.py",
    "test_fsdp_cpu.py",
    "test_lora.py",
    "test_demo.py",
    "test_app.py",
    "test_bucket_training.py",
    "test_verdict.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: two intra-op threads each would fight (OpenMP spins), several times slower.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # and the processes the tests start


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
