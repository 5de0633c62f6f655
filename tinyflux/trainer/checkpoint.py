"""Checkpoint directories: atomic saves, COMPLETE markers, keep-last-N, finding the newest complete one.

A checkpoint is a directory `step_XXXXXXX/` (every N steps, on a signal, at the end) or `epoch_XXXX/` (every N epochs)
under TrainerConfig.checkpoint_dir. Inside:

    model.safetensors          whole model weights (loadable with load_model(dir)): accelerate's save_state for one
                               process / DDP, gathered onto the main process (an export) under FSDP2 and DeepSpeed
    config.json                TinyFluxConfig, so the directory is a model directory for load_model / sample.py
    ema.safetensors            EMA weights in float32 (same keys: load_model(dir, weights_name="ema.safetensors"))
    optimizer.bin, scheduler.bin, random_states_<rank>.pkl    accelerate's save_state (its own format)
    pytorch_model_fsdp_0/, optimizer_0/    FSDP2: model and optimizer shards (torch.distributed.checkpoint)
    pytorch_model/             DeepSpeed: its engine's checkpoint (ZeRO partitions, with DeepSpeed's zero_to_fp32.py)
    trainer_state.json         TrainingProgress: step, epoch, position in the data stream, NaN counters
    adapter_model.safetensors, adapter_config.json, ema/    a LoRA run (docs/LORA.md): the adapter in peft's format,
                               and its EMA the same way; then no model.safetensors (the base is not saved) and
                               ema.safetensors holds the adapter's EMA only
    COMPLETE                   written last, inside the .tmp directory, before the atomic rename

Everything is written into `NAME.tmp/` and renamed to `NAME/` only after every process reported its part written: a
crash or a full disk leaves at most a `.tmp` directory, never a half-written checkpoint under a final name, and the
previous checkpoint is never touched before the new one is complete. The checkpoint directory must be on a file system
that every node sees (every rank writes its shards and RNG state into it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator

from tinyflux.errors import TinyFluxError, os_error_message
from tinyflux.model.loader import EMA_WEIGHTS_NAME

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = EMA_WEIGHTS_NAME
TRAINER_CONFIG = "trainer_config.json"  # the TrainerConfig of the run that wrote the checkpoint
TMP_SUFFIX = ".tmp"
KINDS = ("step", "epoch")
_NAME = re.compile(r"^(step|epoch)_(\d+)$")
logger = logging.getLogger(__name__)


class CheckpointError(TinyFluxError, RuntimeError):
    """A checkpoint that cannot be found, read or written."""


@dataclass
class TrainingProgress:
    """Where a run stands: enough, with accelerate's state and the EMA, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps taken (non-finite ones included: they apply no update)
    epoch: int = 0  # epochs finished
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    samples_in_epoch: int = 0  # samples of the current epoch already consumed, all processes
    micro_step: int = 0  # micro-batches consumed over the whole run; keys the per-batch random draws
    samples_seen: int = 0  # samples consumed over the whole run, all processes
    nan_steps: int = 0  # optimizer steps with a non-finite loss or gradient (no update applied), in total
    nan_streak: int = 0  # consecutive skipped steps right now
    data_state: dict[str, Any] = field(default_factory=dict)  # the loader's own state_dict(), when it has one
    best_val_loss: Optional[float] = None  # lowest validation loss so far (tinyflux.trainer.validation)
    best_val_step: Optional[int] = None  # the step that reached it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainingProgress:
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def batches_to_skip(progress: TrainingProgress, global_batch: int | None) -> int:
    """Micro-batches of the current epoch a resumed run must skip, for a loader of `global_batch` samples per
    micro-batch over all processes (None: unknown, count in micro-batches). Counting in samples lets a run resume with
    another number of processes (same global batch) at the same sample; should the new global batch not divide the
    samples already read, the few in between are skipped, never repeated."""
    if not global_batch or not progress.samples_in_epoch:
        return progress.batches_in_epoch
    skip = -(-progress.samples_in_epoch // global_batch)
    if skip * global_batch != progress.samples_in_epoch:
        logger.warning(
            "resuming with a global batch of %d samples, which does not divide the %d already read this epoch: "
            "skipping %d unread samples",
            global_batch,
            progress.samples_in_epoch,
            skip * global_batch - progress.samples_in_epoch,
        )
    return skip


def checkpoint_name(kind: str, index: int) -> str:
    """`step_0001000` / `epoch_0003`: zero-padded so names sort like their numbers."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r}: one of {KINDS}")
    return f"step_{index:07d}" if kind == "step" else f"epoch_{index:04d}"


def is_complete(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file() and (path / TRAINER_STATE).is_file()


def saved_engine(path: str | os.PathLike) -> str:
    """The kind of engine whose accelerate state checkpoint `path` holds, from its files: "fsdp2" (a sharded
    pytorch_model_fsdp_0/), "deepspeed" (its engine's pytorch_model/) or "whole" (one process / DDP). The three formats
    do not load into one another; within one, any number of processes resumes it (DeepSpeed: the same number)."""
    path = Path(path)
    if (path / "pytorch_model_fsdp_0").is_dir():
        return "fsdp2"
    if (path / "pytorch_model").is_dir():
        return "deepspeed"
    return "whole"


def read_progress(path: str | os.PathLike) -> TrainingProgress:
    state = Path(path) / TRAINER_STATE
    try:
        return TrainingProgress.from_json(state.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {state}: {e}") from e


def list_checkpoints(root: str | os.PathLike, kind: str | None = None) -> list[Path]:
    """Complete checkpoints under root (of one kind, or both), oldest first by training step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (kind is None or match.group(1) == kind) and is_complete(path):
            found.append((read_progress(path).step, match.group(1) == "step", int(match.group(2)), path))
    return [item[-1] for item in sorted(found)]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the most training steps (a step checkpoint wins a tie with an epoch one)."""
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def resolve_resume(value: str | None, root: str | os.PathLike) -> Path | None:
    """The checkpoint that `resume` names: None, "latest" (None when there is none yet), or a directory."""
    if value is None:
        return None
    if value == "latest":
        return find_latest(root)
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"resume={value!r}: no such checkpoint directory (or pass resume='latest')")
    if not is_complete(path):
        raise CheckpointError(
            f"resume={value!r} is not a complete checkpoint (no {MARKER} marker or {TRAINER_STATE}): it was "
            f"interrupted while saving. Use resume='latest' to pick the newest complete one in {path.parent}."
        )
    return path


def prune(root: str | os.PathLike, kind: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints of `kind`; returns what was deleted."""
    doomed = list_checkpoints(root, kind)[:-keep] if keep > 0 else []
    for path in doomed:
        # Rename first so an interrupted delete leaves a `.tmp` leftover, not an incomplete checkpoint.
        trash = path.with_name(path.name + TMP_SUFFIX)
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def clean_stale_tmp(root: str | os.PathLike) -> list[Path]:
    """Remove `.tmp` leftovers of interrupted saves (only call while no save is running)."""
    root = Path(root)
    stale = [p for p in root.glob(f"*{TMP_SUFFIX}") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_text_durably(path: str | os.PathLike, text: str) -> None:
    """Write and fsync, so the bytes are on disk before anything that depends on them (the marker, the rename)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def finalize(tmp_dir: Path, final_dir: Path) -> None:
    """Mark tmp_dir complete and move it to its final name in one atomic rename."""
    write_text_durably(tmp_dir / MARKER, "ok\n")
    if final_dir.exists():
        # Same name saved twice (e.g. a signal at the step of a periodic save): the new one replaces it.
        old = final_dir.with_name(final_dir.name + ".old" + TMP_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)


def all_ok(accelerator: Accelerator, ok: bool) -> bool:
    """True when ok on every process. A collective: every process must call it at the same point."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def _save_error_words(error: BaseException | None, root: Path) -> str:
    """What went wrong, with the errno in view: an OSError's name (ENOSPC), and for torch's writer, whose
    RuntimeError ("enforce fail at inline_container.cc") hides it, the usual cause and the free space now."""
    if error is None:
        return "another process failed to write its part"
    if isinstance(error, OSError):
        return os_error_message(error, "writing it")
    if isinstance(error, RuntimeError) and ("inline_container" in str(error) or "write" in str(error)):
        try:
            free = f"{shutil.disk_usage(root).free / 2**30:.1f} GiB free on {root} now"
        except OSError:
            free = "free space unknown"
        return f"torch's file writer failed ({error}); the usual cause is a full disk (ENOSPC): {free}"
    return str(error)


def save_atomically(accelerator: Accelerator, final: Path, write_extras: Callable[[Path], None]) -> Path:
    """Save accelerate's state plus write_extras(tmp_dir) into `final.tmp`, mark it COMPLETE and rename it to `final`.

    Every process runs save_state (sharded engines write their shards, all write their RNG state) and write_extras
    (which may gather sharded tensors, a collective, and writes files on the main process only); the main process
    then writes the marker and renames. Every process agrees after each stage, so a failure anywhere (a full disk)
    stops all of them at the same point: the .tmp is removed, nothing else is touched, and CheckpointError says why."""
    tmp = final.with_name(final.name + TMP_SUFFIX)
    error: BaseException | None = None

    def attempt(fn: Callable[[], Any]) -> None:
        nonlocal error
        try:
            fn()
        except Exception as e:  # a full disk, a permission problem: report it, keep the run's state
            error = e

    def fresh_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    if accelerator.is_main_process:
        attempt(fresh_tmp)
    if all_ok(accelerator, error is None):
        attempt(lambda: accelerator.save_state(str(tmp)))
    if all_ok(accelerator, error is None):
        attempt(lambda: write_extras(tmp))
    if all_ok(accelerator, error is None) and accelerator.is_main_process:
        attempt(lambda: finalize(tmp, final))
    if all_ok(accelerator, error is None):
        return final
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = find_latest(final.parent)
    raise CheckpointError(
        f"saving checkpoint {final} failed: {_save_error_words(error, final.parent)}. Nothing was "
        f"renamed: the previous checkpoint ({previous or 'none'}) is intact. Free disk space or point checkpoint_dir "
        f"elsewhere; the run can go on, or resume later with --resume latest."
    ) from error
