"""The Trainer's checkpoints: save_checkpoint / load_checkpoint and the periodic save with keep-last-N and upload.

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

import torch
from accelerate.logging import get_logger
from safetensors import SafetensorError

from tinyflux.model.loader import CONFIG_NAME, save_model
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer import engines
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.lora import ADAPTER_WEIGHTS, load_adapter_weights, save_adapter

# accelerate's adapter logs on the main process only: a checkpoint is saved or resumed once per run, not per process
logger = get_logger(__name__)
LORA_EMA_DIR = "ema"  # a LoRA checkpoint's EMA adapter, in peft's format like the trained one beside it
ENGINE_WORDS = {
    "whole": "one process or DDP",
    "fsdp2": "FSDP2 (accelerate_configs/fsdp.yaml)",
    "deepspeed": "DeepSpeed (accelerate_configs/deepspeed_zero*.yaml)",
}


class CheckpointingMixin:
    """Checkpoint methods of tinyflux.trainer.trainer.Trainer (which owns every attribute they use)."""

    def save_checkpoint(self, path: str | Path) -> Path:
        """Save everything needed to resume (and to sample) into directory `path`, atomically: written into
        `path.tmp`, marked COMPLETE, renamed. On failure the .tmp is removed, earlier checkpoints are untouched and
        CheckpointError says what happened; the training state in memory is unchanged either way."""
        if self._model is None:
            raise RuntimeError(
                "call trainer.setup(dataloader, ...) before save_checkpoint(): accelerate saves prepared state"
            )
        if self._stateful_loader:
            self.progress.data_state = self.dataloader.state_dict()
        final = ckpt.save_atomically(self.accelerator, Path(path), self._write_extras)
        self.last_checkpoint, self._saved_step = final, self.progress.step
        return final

    def _write_extras(self, tmp: Path) -> None:
        """What accelerate's save_state does not write: the model config, the EMA (float32, for exact resume), the
        progress and, where save_state keeps the weights sharded (FSDP2, DeepSpeed), a consolidated model.safetensors,
        so that the directory is a model directory for load_model and sample.py under every engine.

        Runs on every process: the gathers are collectives and all come before any file is written, so a failed
        write on the main process cannot leave the others waiting in a gather."""
        weights = None if self.engine.saves_model_weights else engines.full_state_dict(self.accelerator, self._model)
        ema = engines.gathered_ema(self._ema, self.accelerator)
        if not self.accelerator.is_main_process:
            return
        if self.lora is not None:  # the adapter, the trained one and the EMA's, in peft's format; no base weights
            save_adapter(self.model, tmp, state_dict=weights)
            save_adapter(self.model, tmp / LORA_EMA_DIR, state_dict=ema.shadow)
        elif weights is not None:
            save_model(self.model, tmp, state_dict=weights)
        self.model.config.save_json(tmp / CONFIG_NAME)
        ema.save(str(tmp / ckpt.EMA_WEIGHTS), dtype=torch.float32)
        ckpt.write_text_durably(tmp / ckpt.TRAINER_STATE, self.progress.to_json())
        # the run's settings beside its weights: sample.py reads the training shift from it
        ckpt.write_text_durably(tmp / ckpt.TRAINER_CONFIG, json.dumps(self.config.to_dict(), indent=2))

    def register_lora_hooks(self) -> None:
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

    def _save(self, kind: str, index: int, periodic: bool = True) -> Path | None:
        """Save checkpoint kind_index and prune old ones; a periodic save that fails is logged and training goes on."""
        root = Path(self.config.checkpoint_dir)
        try:
            path = self.save_checkpoint(root / ckpt.checkpoint_name(kind, index))
        except ckpt.CheckpointError as e:
            if not periodic:
                raise
            self.save_failures += 1
            logger.error("%s (training goes on; the next save tries again)", e)
            return None
        if self.accelerator.is_main_process:
            keep = self.config.keep_last_n_steps if kind == "step" else self.config.keep_last_n_epochs
            ckpt.prune(root, kind, keep)
        self.accelerator.wait_for_everyone()
        logger.info("saved %s", path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG (accelerate), EMA and progress from a complete checkpoint.
        Before setup() the load is deferred to setup(); under FSDP2 / ZeRO-3 it must be (resume= in the config)."""
        path = Path(path)
        if not ckpt.is_complete(path):
            raise ckpt.CheckpointError(f"{path} is not a complete checkpoint (no {ckpt.MARKER} marker)")
        if self._model is None:
            self._pending_resume = path
            return
        if self.engine.shards_parameters:
            raise ckpt.CheckpointError(
                f"under {self.engine} a checkpoint loads during setup(), while the EMA is still whole: pass "
                f"resume={str(path)!r} in the TrainerConfig (--resume on the command line) instead"
            )
        self._load_ema(path)
        self._load_training_state(path)

    def _resume_falling_back(
        self, path: Path, load: Callable[[Path], None], fallback_load: Callable[[Path], None]
    ) -> Path:
        """load(path); when that raises CheckpointError under resume=latest, the next older complete checkpoint
        through fallback_load, and so on, saying which checkpoint was damaged and which one the run resumes from.
        Returns the checkpoint loaded. Not under FSDP2 / ZeRO-3, whose state loads only during setup()."""
        try:
            load(path)
            return path
        except ckpt.CheckpointError as first:
            if self.config.resume != "latest" or self.engine.shards_parameters:
                raise
            error, damaged = first, path
        for older in reversed(ckpt.list_checkpoints(self.config.checkpoint_dir)):
            if ckpt.read_progress(older).step >= ckpt.read_progress(damaged).step or older == damaged:
                continue
            logger.warning("resume=latest: %s is damaged (%s); resuming from the older %s", damaged, error, older)
            try:
                fallback_load(older)
                return older
            except ckpt.CheckpointError as e:
                error, damaged = e, older
        raise ckpt.CheckpointError(
            f"resume=latest: no complete checkpoint in {self.config.checkpoint_dir} loads; the last tried, "
            f"{damaged}: {error}"
        ) from error

    def _load_ema(self, path: Path) -> None:
        """The EMA file (whole float32 tensors) into the existing EMA object, which a Sampler may hold; decay and
        warmup stay those of this run's config."""
        self._check_lora_kind(path)
        try:
            loaded = EMA.load(str(path / ckpt.EMA_WEIGHTS), self.model)
        except (OSError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: its EMA cannot be read ({e})") from e
        self._ema.load_state_dict(loaded.state_dict())
        self._ema.decay = self.config.ema_decay

    def _check_lora_kind(self, path: Path) -> None:
        """A LoRA checkpoint resumes only a LoRA run and a full one only a full run: say which, and what to do."""
        holds_adapter = (path / ADAPTER_WEIGHTS).is_file()
        if holds_adapter and self.lora is None:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: it holds a LoRA adapter, not the model's weights. Resume with the run's "
                "LoRA settings (--lora_rank / --lora_config) and its base (--model), or merge the adapter into a full "
                "checkpoint (python -m tinyflux.trainer.lora merge-lora) and start a new run from that"
            )
        if not holds_adapter and self.lora is not None:
            raise ckpt.CheckpointError(
                f"cannot resume a LoRA run from {path}: it holds full weights, no {ADAPTER_WEIGHTS}. Start the LoRA "
                f"run from it instead: --model {path} without --resume"
            )

    def _load_training_state(self, path: Path) -> None:
        """accelerate's state (model, optimizer, scheduler, RNG; sharded ones reshard to this number of processes),
        then the progress and the data stream's position."""
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
        self.progress = ckpt.read_progress(path)
        if self._stateful_loader and self.progress.data_state:
            self.dataloader.load_state_dict(self.progress.data_state)
        self.last_checkpoint, self._saved_step = path, self.progress.step
        self._pending_resume = None
        logger.info("resumed from %s at step %d (epoch %d)", path, self.progress.step, self.progress.epoch)

    def _upload(self, checkpoint: Path) -> None:
        if self.accelerator.is_main_process and self.uploader is not None:
            self.uploader.upload_checkpoint(checkpoint, self.progress.step)
