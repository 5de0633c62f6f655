"""DataLoader worker processes and the stop signals: workers ignore SIGTERM / SIGUSR1 (the main process saves and
stops them), are forked with those signals blocked, and are killed at exit if a loader left them running. Shared by
the cache's loaders and the Trainer."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM / SIGUSR1 pending in this thread (delivered on exit). DataLoader workers forked meanwhile inherit
    the mask, so a signal that reaches them before their worker_init_fn (WorkerInit) has set SIG_IGN cannot kill them:
    setting SIG_IGN discards it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerInit:
    """A DataLoader worker_init_fn that makes the worker ignore SIGTERM / SIGUSR1, then calls `then(worker_id)`.

    `accelerate launch` (torchrun's agent) forwards these signals to its whole process group and SLURM sends them to
    every process of a step: without this, the workers die first (torch's worker handler re-raises a SIGTERM that did
    not come from its parent) and the main process fails with "DataLoader worker (pid N) is killed by signal" before
    it can save. Ignoring them leaves the stop to the main process, which saves at the next step boundary; the loader
    then shuts its workers down as usual (and a worker whose parent died exits by torch's watchdog within 5 s)."""

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then
        _kill_workers_left_at_exit()

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked while it was forked (stop_signals_blocked)
        if self.then is not None:
            self.then(worker_id)


_exit_hook_registered = False


def _kill_workers_left_at_exit() -> None:
    """Once per process: at interpreter exit, SIGKILL the daemonic children still alive.

    multiprocessing's own exit hook stops daemonic children (DataLoader workers) with SIGTERM, then joins them. Ours
    ignore SIGTERM (WorkerInit), so a worker of a loader iterator not yet collected at exit (one held by a traceback
    or a reference cycle) would make that join wait forever: the process would never exit. atexit runs hooks last-in
    first-out, so this one, registered after multiprocessing's, runs first."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_daemonic_children)
        _exit_hook_registered = True


def _kill_daemonic_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a failed worker
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def workers_ignore_stop_signals(loader: Any) -> None:
    """Give a torch DataLoader with worker processes a WorkerInit (keeping its own worker_init_fn)."""
    if isinstance(loader, DataLoader) and loader.num_workers > 0 and not isinstance(loader.worker_init_fn, WorkerInit):
        loader.worker_init_fn = WorkerInit(loader.worker_init_fn)


def started(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate `loader`, starting it with the stop signals blocked (stop_signals_blocked): a lazy loader (accelerate's
    prepared one) forks its workers on its first batch, a torch DataLoader on iter()."""
    with stop_signals_blocked():
        batches = iter(loader)
        first = next(batches, _END)
    if first is _END:
        return
    yield first
    yield from batches


_END = object()
