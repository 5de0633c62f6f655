"""The verdict of an optimizer step: was it finite on every process, and did a stop signal arrive on any.

Reading the verdict is the one host sync a training step would need. Where the optimizer can skip a non-finite update
on the device itself (torch's fused Adam / AdamW read a `found_inf` tensor: the hook GradScaler uses), the step does
not wait for it: the flags are copied to the host without blocking and read one step later, when the device has
finished that step while the host is already queueing the next one. Elsewhere (Adafactor, 8-bit AdamW, DeepSpeed,
FSDP2, fp16's loss scaler) the flags are read at once, as before.

Either way a non-finite step applies no update: no weight or optimizer moment moves, while the step counter and the LR
schedule advance as for any other step, and the EMA takes its ordinary update toward the unchanged weights (so it needs
no verdict; only under DeepSpeed, which may have applied the step, does it skip). So both paths train the same
weights, and the only difference is when the host learns of a bad step (its warning, `nan_steps`, the
`max_nan_steps` stop, a signal's stop): one step later on the deferred path, never later than the next checkpoint,
which settles first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinyflux.errors import TinyFluxError
from tinyflux.trainer.optim import torch_optimizer

__all__ = ["Flags", "NonFiniteLossError", "StepVerdicts", "book", "fused_adam"]

logger = logging.getLogger("tinyflux.trainer.trainer")  # the trainer's log: a user filters one name


class NonFiniteLossError(TinyFluxError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass(frozen=True)
class Flags:
    """A step's verdict on the host: `bad` on any process, `stop` requested on any."""

    bad: bool
    stop: bool


def fused_adam(optimizer: torch.optim.Optimizer) -> bool:
    """A torch Adam / AdamW with fused=True: its step reads `found_inf` and leaves everything unchanged when it is 1."""
    inner = torch_optimizer(optimizer)
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and bool(inner.defaults.get("fused"))


class StepVerdicts:
    """Measures each optimizer step's flags on the device, gates the optimizer with them, and hands the host the
    verdicts in step order: `push(flags)` returns the verdict it can read without waiting (the previous step's on the
    deferred path, this step's otherwise); `settle()` returns the one still pending, waiting if need be."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, deferred: bool, num_processes: int):
        self.device = device
        self.deferred = deferred
        self._optimizer = torch_optimizer(optimizer)
        self._num_processes = num_processes
        self._pending: tuple[Tensor, torch.cuda.Event | None] | None = None

    def measure(self, loss: Tensor, grad_norm: Tensor | None, check_grad: bool, signal: bool, reduce) -> Tensor:
        """(2,) float32 on the device: [processes whose step is bad, processes that caught a signal]. No host sync."""
        bad = ~torch.isfinite(loss.to(self.device))
        if grad_norm is not None and check_grad:
            bad = bad | ~torch.isfinite(grad_norm.to(self.device))
        flags = torch.stack([bad.float(), torch.full((), float(signal), device=self.device)])  # a fill, not a copy
        return reduce(flags) if self._num_processes > 1 else flags

    def gate(self, flags: Tensor) -> None:
        """Deferred path: the next optimizer.step() applies nothing (and takes its step count back) if flags say bad."""
        if self.deferred:
            self._optimizer.found_inf = (flags[0] > 0).float()  # 0-dim, like the step counts it is subtracted from

    def push(self, flags: Tensor) -> Flags | None:
        if not self.deferred:
            return _read(flags)
        previous = self.settle()
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (flags, None)
        return previous

    def settle(self) -> Flags | None:
        """The pending verdict (waits for its step to finish on the device), or None."""
        if self._pending is None:
            return None
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return _read(host)


def _read(flags: Tensor) -> Flags:
    bad, stop = flags.tolist()
    return Flags(bad=bad > 0, stop=stop > 0)


def book(progress: Any, verdict: Flags | None, step: int, max_nan_steps: int, last_checkpoint: Path | None) -> bool:
    """Record a verdict the host has read (of optimizer step `step`) in the TrainingProgress; raise NonFiniteLossError
    after max_nan_steps bad ones in a row. Returns whether a stop signal arrived."""
    if verdict is None:
        return False
    if not verdict.bad:
        progress.nan_streak = 0
        return verdict.stop
    progress.nan_steps += 1
    progress.nan_streak += 1
    logger.warning(
        "non-finite loss or gradient at step %d: no update applied (%d in a row, %d in total)",
        step,
        progress.nan_streak,
        progress.nan_steps,
    )
    if progress.nan_streak >= max_nan_steps:
        raise NonFiniteLossError(
            f"{progress.nan_streak} consecutive steps had a non-finite loss or gradient (max_nan_steps="
            f"{max_nan_steps}) at step {step}. Lower learning_rate or raise warmup_steps, check the cache for NaN/inf "
            f"values, train in bfloat16/float32 rather than float16, and resume from the last good checkpoint "
            f"({last_checkpoint or 'none saved yet'}) with --resume latest."
        )
    return verdict.stop
