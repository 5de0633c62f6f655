"""The Trainer's checkpointer: save_checkpoint / load_checkpoint, the periodic save with keep-last-N, resume with
resume=latest's fallback, and the Hub upload.

Saving goes through checkpoint.save_atomically (every process writes its part, the main process marks it COMPLETE
and renames it); under FSDP2 and DeepSpeed the weights stay sharded in accelerate's state and a whole
model.safetensors is exported next to them. Loading reads the EMA before accelerator.prepare, while its tensors are
whole on every process (FSDP2 then shards it like the parameters), and accelerate's state after.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import SafetensorError
from torch import nn

from tinyflux.model.loader import CONFIG_NAME, save_model
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer import engines
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.hub import HubUploader
from tinyflux.trainer.lora import ADAPTER_WEIGHTS, load_adapter_weights, save_adapter
from tinyflux.trainer.training_loader import TrainingLoader

# accelerate's adapter logs on the main process only: a checkpoint is saved or resumed once per run, not per process
logger = get_logger(__name__)
LORA_EMA_DIR = "ema"  # a LoRA checkpoint's EMA adapter, in peft's format like the trained one beside it
ENGINE_WORDS = {
    "whole": "one process or DDP",
    "fsdp2": "FSDP2 (accelerate_configs/fsdp.yaml)",
    "deepspeed": "DeepSpeed (accelerate_configs/deepspeed_zero*.yaml)",
}
T = TypeVar("T")


class Checkpointer:
    """Writes and reads the checkpoints of one run, as torchtitan's Trainer holds its CheckpointManager.

    It holds what a checkpoint is made of: the accelerator (whose state it saves), the engine, the model and its EMA,
    and, from Trainer.setup, the prepared model. The Trainer owns the progress and the loader: save() records the
    progress and the loader's position it is given, load() restores the loader's position and returns the progress.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        engine: engines.Engine,
        model: TinyFluxDeep,
        ema: EMA,
        *,
        root: str | Path,
        keep_last_n_steps: int,
        keep_last_n_epochs: int,
        resume: str | None,
        settings: dict[str, Any],
        lora: bool = False,
        uploader: HubUploader | None = None,
    ):
        self.accelerator, self.engine, self.model, self.ema = accelerator, engine, model, ema
        self.root = Path(root)
        self.keep = {"step": keep_last_n_steps, "epoch": keep_last_n_epochs}
        self.resume = resume  # None, "latest" or a checkpoint directory (TrainerConfig.resume)
        self.settings = settings  # the run's TrainerConfig.to_dict(), written beside the weights
        self.lora, self.uploader = lora, uploader
        # the prepared model (DDP / DeepSpeed wrapper, or FSDP2 in place), set by Trainer.setup
        self.prepared: nn.Module | None = None
        self.last: Path | None = None  # the newest checkpoint saved or loaded
        self.saved_step: int | None = None  # its step
        self.failures = 0  # periodic saves that failed (training went on)
        self.pending: Path | None = None  # a load_checkpoint() before setup: loaded by setup()
        if lora:
            self._register_lora_hooks()

    def save(self, path: str | Path, progress: ckpt.TrainingProgress, loader: TrainingLoader) -> Path:
        """Save everything needed to resume (and to sample) into directory `path`, atomically: written into
        `path.tmp`, marked COMPLETE, renamed. On failure the .tmp is removed, earlier checkpoints are untouched and
        CheckpointError says what happened; the training state in memory is unchanged either way."""
        if self.prepared is None:
            raise RuntimeError(
                "call trainer.setup(dataloader, ...) before save_checkpoint(): accelerate saves prepared state"
            )
        progress.data_state = loader.state_dict()
        final = ckpt.save_atomically(self.accelerator, Path(path), lambda tmp: self._write_extras(tmp, progress))
        self.last, self.saved_step = final, progress.step
        return final

    def _write_extras(self, tmp: Path, progress: ckpt.TrainingProgress) -> None:
        """What accelerate's save_state does not write: the model config, the EMA (float32, for exact resume), the
        progress and, where save_state keeps the weights sharded (FSDP2, DeepSpeed), a consolidated model.safetensors,
        so that the directory is a model directory for load_model and sample.py under every engine.

        Runs on every process: the gathers are collectives and all come before any file is written, so a failed
        write on the main process cannot leave the others waiting in a gather."""
        weights = None if self.engine.saves_model_weights else engines.full_state_dict(self.accelerator, self.prepared)
        ema = engines.gathered_ema(self.ema, self.accelerator)
        if not self.accelerator.is_main_process:
            return
        if self.lora:  # the adapter, the trained one and the EMA's, in peft's format; no base weights
            save_adapter(self.model, tmp, state_dict=weights)
            save_adapter(self.model, tmp / LORA_EMA_DIR, state_dict=ema.shadow)
        elif weights is not None:
            save_model(self.model, tmp, state_dict=weights)
        self.model.config.save_json(tmp / CONFIG_NAME)
        ema.save(str(tmp / ckpt.EMA_WEIGHTS), dtype=torch.float32)
        ckpt.write_text_durably(tmp / ckpt.TRAINER_STATE, progress.to_json())
        # the run's settings beside its weights: sample.py reads the training shift from it
        ckpt.write_text_durably(tmp / ckpt.TRAINER_CONFIG, json.dumps(self.settings, indent=2))

    def _register_lora_hooks(self) -> None:
        """A LoRA run's accelerate state holds the adapter, not the frozen base: accelerate's save_state writes no
        model.safetensors (_write_extras writes the adapter) and load_state reads the adapter's file instead."""

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            weights.clear()

        def load_hook(models: list, input_dir: str) -> None:
            if models:  # one process / DDP; FSDP2 loads its sharded state (adapter included) itself
                models.clear()
                load_adapter_weights(self.model, input_dir)

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_numbered(
        self, kind: str, index: int, progress: ckpt.TrainingProgress, loader: TrainingLoader, periodic: bool = True
    ) -> Path | None:
        """Save checkpoint kind_index and prune old ones; a periodic save that fails is logged and training goes on."""
        try:
            path = self.save(self.root / ckpt.checkpoint_name(kind, index), progress, loader)
        except ckpt.CheckpointError as e:
            if not periodic:
                raise
            self.failures += 1
            logger.error("%s (training goes on; the next save tries again)", e)
            return None
        if self.accelerator.is_main_process:
            ckpt.prune(self.root, kind, self.keep[kind])
        self.accelerator.wait_for_everyone()
        logger.info("saved %s", path)
        return path

    def upload(self, checkpoint: Path, step: int) -> None:
        if self.accelerator.is_main_process and self.uploader is not None:
            self.uploader.upload_checkpoint(checkpoint, step)

    def to_resume(self) -> Path | None:
        """The checkpoint setup() resumes from: one load_checkpoint() named before, or what `resume` names."""
        resume = self.pending or ckpt.resolve_resume(self.resume, self.root)
        if resume is None and self.resume is None and ckpt.list_checkpoints(self.root):
            # a fresh run would overwrite same-named checkpoints and prune by step number across both runs
            raise ckpt.CheckpointError(
                f"{self.root} already holds checkpoints of another run; continue it with --resume latest, "
                "or train into a new --checkpoint_dir"
            )
        return resume

    def load(self, path: str | Path, loader: TrainingLoader | None) -> ckpt.TrainingProgress | None:
        """Restore model, optimizer, scheduler, RNG (accelerate), EMA and the loader's position from a complete
        checkpoint; returns its progress. Before setup() the load is deferred to setup() (returns None); under
        FSDP2 / ZeRO-3 it must be (resume= in the config)."""
        path = Path(path)
        if not ckpt.is_complete(path):
            raise ckpt.CheckpointError(f"{path} is not a complete checkpoint (no {ckpt.MARKER} marker)")
        if self.prepared is None:
            self.pending = path
            return None
        if self.engine.shards_parameters:
            raise ckpt.CheckpointError(
                f"under {self.engine} a checkpoint loads during setup(), while the EMA is still whole: pass "
                f"resume={str(path)!r} in the TrainerConfig (--resume on the command line) instead"
            )
        self.load_ema(path)
        return self.load_training_state(path, loader)

    def resume_falling_back(self, path: Path, load: Callable[[Path], T], fallback_load: Callable[[Path], T]) -> T:
        """load(path); when that raises CheckpointError under resume=latest, the next older complete checkpoint
        through fallback_load, and so on, saying which checkpoint was damaged and which one the run resumes from.
        Returns what the load that succeeded returned. Not under FSDP2 / ZeRO-3, whose state loads only during
        setup()."""
        try:
            return load(path)
        except ckpt.CheckpointError as first:
            if self.resume != "latest" or self.engine.shards_parameters:
                raise
            error, damaged = first, path
        for older in reversed(ckpt.list_checkpoints(self.root)):
            if ckpt.read_progress(older).step >= ckpt.read_progress(damaged).step or older == damaged:
                continue
            logger.warning("resume=latest: %s is damaged (%s); resuming from the older %s", damaged, error, older)
            try:
                return fallback_load(older)
            except ckpt.CheckpointError as e:
                error, damaged = e, older
        raise ckpt.CheckpointError(
            f"resume=latest: no complete checkpoint in {self.root} loads; the last tried, {damaged}: {error}"
        ) from error

    def load_ema(self, path: Path) -> Path:
        """The EMA file (whole float32 tensors) into the existing EMA object, which a Sampler may hold; its decay
        stays this run's. Returns path."""
        self._check_lora_kind(path)
        try:
            loaded = EMA.load(str(path / ckpt.EMA_WEIGHTS), self.model)
        except (OSError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: its EMA cannot be read ({e})") from e
        decay = self.ema.decay
        self.ema.load_state_dict(loaded.state_dict())
        self.ema.decay = decay
        return path

    def _check_lora_kind(self, path: Path) -> None:
        """A LoRA checkpoint resumes only a LoRA run and a full one only a full run: say which, and what to do."""
        holds_adapter = (path / ADAPTER_WEIGHTS).is_file()
        if holds_adapter and not self.lora:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: it holds a LoRA adapter, not the model's weights. Resume with the run's "
                "LoRA settings (--lora_rank / --lora_config) and its base (--model), or merge the adapter into a full "
                "checkpoint (python -m tinyflux.trainer.lora merge-lora) and start a new run from that"
            )
        if not holds_adapter and self.lora:
            raise ckpt.CheckpointError(
                f"cannot resume a LoRA run from {path}: it holds full weights, no {ADAPTER_WEIGHTS}. Start the LoRA "
                f"run from it instead: --model {path} without --resume"
            )

    def load_training_state(self, path: Path, loader: TrainingLoader) -> ckpt.TrainingProgress:
        """accelerate's state (model, optimizer, scheduler, RNG; sharded ones reshard to this number of processes),
        then the data stream's position; returns the progress."""
        written, running = ckpt.saved_engine(path), engines.state_format(self.engine)
        if written != running:
            # accelerate would stop at the first file of its own format that is missing (optimizer.bin, ...)
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: it holds the training state of {ENGINE_WORDS[written]}, and this run is "
                f"{ENGINE_WORDS[running]} ({self.engine}); one engine's state does not load into another's. Resume "
                "with the engine that wrote it (FSDP2 and DDP checkpoints resume on any number of processes), or "
                f"start a new run from its weights (fresh optimizer): --model {path}"
            )
        try:
            self.accelerator.load_state(str(path))
        except (OSError, ValueError, RuntimeError, SafetensorError, EOFError, pickle.UnpicklingError) as e:
            # EOFError: a zero-byte optimizer.bin / scheduler.bin (torch.load of an empty file)
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: accelerate could not load its state ({type(e).__name__}: {e}). The "
                "checkpoint is damaged or was written by another model / engine; resume from an older one"
            ) from e
        progress = ckpt.read_progress(path)
        if progress.data_state:
            loader.load_state_dict(progress.data_state)
        self.last, self.saved_step = path, progress.step
        self.pending = None
        logger.info("resumed from %s at step %d (epoch %d)", path, progress.step, progress.epoch)
        return progress
