"""--resolution_schedule: one run trains on one --cache set, then the next, from given optimizer steps on.

"0:low,5000:high" streams the cache set named `low` (as given to --cache, or its directory's name) for steps 0-4999
and `high` from step 5000 on: the low-resolution-first recipe in one run, its optimizer and LR schedule untouched
(they never see the data). Each set keeps its own StreamingLoader (buckets and all), so a set the schedule returns to
continues its stream where it left it. A switch ends the trainer's epoch (the next batch has another shape and
another data set), so an epoch is a pass of one set or the part of it before a switch. The state (the active set,
the epoch offset and every set's stream position) is saved with each checkpoint: a run resumed across a switch is
the run that never stopped. Format and flags: docs/CACHE_FORMAT.md, "Several resolutions in one run".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tinyflux.errors import TinyFluxError

_STATE_VERSION = 1


class ScheduleError(TinyFluxError, ValueError):
    """A --resolution_schedule that cannot be followed."""


def cache_names(caches: Sequence[str]) -> list[str]:
    """The name of each --cache set in a schedule: its directory's (or URL prefix's) last component."""
    return [Path(str(c).rstrip("/")).name for c in caches]


def parse_resolution_schedule(spec: str, caches: Sequence[str]) -> list[tuple[int, int]]:
    """ "STEP:CACHE,STEP:CACHE,..." -> [(first step, index into caches)], steps increasing from 0; CACHE is a
    --cache value or its last path component. ScheduleError (one line) for anything else."""
    names, out = cache_names(caches), []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        step, sep, name = entry.partition(":")
        try:
            first = int(step)
        except ValueError:
            first = -1
        if not sep or first < 0 or not name:
            raise ScheduleError(f"--resolution_schedule entry {entry!r} is not STEP:CACHE (e.g. '0:cache_256')")
        if name in caches:
            index = list(caches).index(name)
        elif names.count(name) == 1:
            index = names.index(name)
        else:
            why = "names two --cache sets: give its path" if names.count(name) > 1 else "is no --cache set"
            raise ScheduleError(f"--resolution_schedule entry {entry!r}: {name!r} {why} (--cache: {', '.join(caches)})")
        out.append((first, index))
    if not out:
        raise ScheduleError(f"--resolution_schedule {spec!r} lists no entry: give 'STEP:CACHE,STEP:CACHE'")
    if out[0][0] != 0:
        raise ScheduleError(f"--resolution_schedule {spec!r} must start at step 0 (e.g. '0:{names[out[0][1]]},...')")
    steps = [s for s, _ in out]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ScheduleError(f"--resolution_schedule {spec!r}: its steps {steps} must increase")
    unused = [caches[i] for i in range(len(caches)) if i not in {j for _, j in out}]
    if unused:
        raise ScheduleError(
            f"--resolution_schedule never trains on --cache {', '.join(unused)}: schedule it or drop it"
        )
    return out


class ScheduledLoader:
    """The StreamingLoader of the scheduled cache set of the current step (module docstring).

    The run tells it the step (follow_steps, trainer/main.py); before each batch it checks whether the schedule has
    moved on, and if so ends the iteration (the epoch) after closing the old set's workers; the next iteration streams
    the new set.
    """

    def __init__(self, loaders: Sequence[Any], schedule: Sequence[tuple[int, int]]):
        self.loaders, self.schedule = list(loaders), list(schedule)
        self.active = self.schedule[0][1]  # the set whose loader served the last batch
        self.base = 0  # this loader's epoch minus the active set's loader's
        self._step_of: Callable[[], int] = lambda: 0

    def follow_steps(self, step_of: Callable[[], int]) -> None:
        """`step_of()` is the optimizer step the next batch trains (the Trainer passes its progress)."""
        self._step_of = step_of

    def set_at(self, step: int) -> int:
        """The index of the --cache set the schedule trains at `step`."""
        return [index for first, index in self.schedule if first <= step][-1]

    @property
    def _due(self) -> bool:
        return self.set_at(self._step_of()) != self.active

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to: a due switch starts a new one unless the active pass just ended."""
        loader = self.loaders[self.active]
        return self.base + loader.epoch + int(self._due and not loader.at_pass_start)

    @property
    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The shapes of the active set (the training grid shows those)."""
        return self.loaders[self.set_at(self._step_of())].bucket_shapes

    def __len__(self) -> int:
        return len(self.loaders[self.active])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yielded = False
        while True:
            if self._due:
                self._switch()
                if yielded:  # the epoch ends at the switch
                    return
            batches = iter(self.loaders[self.active])
            while not self._due:
                batch = next(batches, None)
                if batch is None:  # the set's pass ended
                    return
                batch["dataset_id"] = torch.full_like(batch["dataset_id"], self.active)  # its --cache position
                yielded = True
                yield batch

    def _switch(self) -> None:
        epoch = self.epoch
        self.loaders[self.active].close()
        self.active = self.set_at(self._step_of())
        self.base = epoch - self.loaders[self.active].epoch

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch` if the loader is behind it; a no-op otherwise (the state decides)."""
        if epoch > self.epoch:
            self.loaders[self.active].set_epoch(epoch - self.base)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "active": self.active,
            "base": self.base,
            "schedule": [list(entry) for entry in self.schedule],
            "loaders": [loader.state_dict() for loader in self.loaders],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("loaders", [])) != len(self.loaders):
            raise ScheduleError(
                f"the saved data state is for {len(state.get('loaders', []))} scheduled --cache set(s), this run has "
                f"{len(self.loaders)}: resume with the same --cache sets, or start a new run"
            )
        for loader, saved in zip(self.loaders, state["loaders"], strict=True):
            loader.load_state_dict(saved)
        self.active, self.base = int(state["active"]), int(state["base"])
