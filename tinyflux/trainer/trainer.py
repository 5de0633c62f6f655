"""Trainer: one Accelerator, one place that computes the loss (train_step), and a loop that survives bad steps.

The loop, per micro-batch: train_step -> accelerator.backward inside accelerator.accumulate; on the micro-batch that
completes an accumulation cycle: clip, the step's verdict (was the loss / gradient finite on every process, did a signal
arrive on any), optimizer + scheduler step (a non-finite step applies no update), EMA update, and the periodic log /
checkpoint / sample grid / Hub upload. Values are read off the device only at log steps and checkpoints: with torch's
fused AdamW the optimizer skips a bad step on the device and the host reads the verdict one step late (verdict.py);
with other optimizers and engines it reads it at once.

Random draws (timesteps, noise, dropout) come from a generator seeded by (seed, micro-batch number) and are drawn for
the global batch, each process taking its slice: a run is reproducible, resumes exactly, and N processes with batch
B draw the same numbers as one process with batch N * B.

The engine (one process, DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) is the `accelerate launch` config's; what differs
between them (sharded EMA, exports, DeepSpeed's settings) is in engines.py. The Trainer holds its components: the
Checkpointer (checkpointer.py) and a TrainingLoader (training_loader.py), whichever kind of loader it is.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tinyflux.cache.buckets import sample_shapes
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.sampling.conditioning import drop_text
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer import engines
from tinyflux.trainer.batch import (
    Teacher,
    check_batch,
    kept,
    masked_mean,
    pad_text,
    spatial_weights,
    step_draws,
    teacher_features,
    to_device,
)
from tinyflux.trainer.checkpointer import Checkpointer
from tinyflux.trainer.config import TrainerConfig, TrainerConfigError
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.hub import HubUploader
from tinyflux.trainer.lora import LoraSpec, apply_lora
from tinyflux.trainer.losses import compute_lune_loss, compute_main_loss, compute_sol_loss, min_snr_weight
from tinyflux.trainer.metrics import StepMeter, StreamParams, device_peak_tflops, flops_per_sample, mfu
from tinyflux.trainer.optim import (
    build_optimizer,
    build_scheduler,
    clear_step_scales,
    clip_in_fused_step,
    torch_optimizer,
)
from tinyflux.trainer.runtime import (
    check_compile_mode,
    compile_model,
    compiled_whole,
    has_compiled_blocks,
    hparams,
    log_sample_grid,
    make_accelerator,
    started,
    stop_signals,
    whole_graph_errors,
    workers_ignore_stop_signals,
)
from tinyflux.trainer.schedules import get_lune_weight, get_sol_weight
from tinyflux.trainer.training_loader import TrainingLoader, prepare_for_training
from tinyflux.trainer.validation import Validator
from tinyflux.trainer.verdict import Flags, NonFiniteLossError, StepVerdicts, book, fused_adam
from tinyflux.util.predictions import flow_velocity, flow_x_t

__all__ = ["NonFiniteLossError", "Trainer", "TrainerConfig"]

logger = logging.getLogger(__name__)


class Trainer:
    """Trains a TinyFluxDeep: Trainer(model, config); setup(dataloader, cache, sampler); train(epochs)."""

    def __init__(self, model: TinyFluxDeep, config: TrainerConfig):
        self.config = config
        self.accelerator = make_accelerator(config)
        self.engine = engines.configure(self.accelerator, config)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            logger.warning("model weights are not float32: converting (mixed precision keeps float32 master weights)")
        self.model = model.to(device=self.accelerator.device, dtype=torch.float32)
        # LoRA: peft's adapters injected in place, every other weight frozen; None for a full fine-tune
        self.lora = LoraSpec.from_trainer_config(config)
        lr_scales = {}
        if self.lora is not None:
            if self.engine.name == "deepspeed":
                raise engines.EngineError(
                    "LoRA under DeepSpeed is not supported: launch a LoRA run on one process, DDP "
                    "(accelerate_configs/multi_gpu.yaml) or FSDP2 (fsdp.yaml); an adapter's optimizer state is small"
                )
            _, lr_scales = apply_lora(model, self.lora)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if config.attention_backend == "flex" and self.accelerator.device.type == "cpu":
            raise TrainerConfigError(
                "attention_backend='flex' cannot train on the CPU: PyTorch has no CPU backward for FlexAttention. "
                "Use attention_backend='sdpa' (the same attention), or train on a GPU"
            )
        model.set_attention_backend(config.attention_backend)
        # Every block's adaLN and Sol scales in one call before the blocks: not where the blocks' weights are gathered
        # only for their own forward.
        model.set_fused_conditioning(not self.engine.shards_parameters)
        check_compile_mode(config.compile_mode, self.engine, config.compile_scope)
        if config.compile_mode is not None:
            regions = compile_model(model, config.compile_mode, config.compile_scope)
            logger.info("compiled %d region(s) (mode=%s, scope=%s)", regions, config.compile_mode, config.compile_scope)
        self._params = model.get_trainable_parameters()
        self._stream_params = StreamParams.of(model)
        self.optimizer = build_optimizer(self._params, config, self.accelerator.device, lr_scales)
        self.scheduler = build_scheduler(self.optimizer, config)
        self._ema = EMA(model, config.ema_decay, warmup=config.ema_warmup, trainable_only=self.lora is not None)
        self.progress = ckpt.TrainingProgress()
        uploader = HubUploader(config.hf_repo_id, config.checkpoint_dir) if config.hf_repo_id else None
        self.checkpointer = Checkpointer(
            self.accelerator,
            self.engine,
            self.model,
            self._ema,
            root=config.checkpoint_dir,
            keep_last_n_steps=config.keep_last_n_steps,
            keep_last_n_epochs=config.keep_last_n_epochs,
            resume=config.resume,
            settings=config.to_dict(),
            lora=self.lora is not None,
            uploader=uploader,
        )
        self.dataloader: TrainingLoader | None = None  # set by setup()
        self.cache: Any = None
        self.sampler: Any = None
        self.validator: Validator | None = None  # the held-out loss, every validation_every steps (main.py sets it)
        self._stop_at = config.total_steps
        self.stopped_by: str | None = None  # "SIGTERM" / "SIGUSR1" when a signal ended train()
        self._model: nn.Module | None = None  # the prepared model (DDP / DeepSpeed wrapper, or FSDP2 in place)
        self._input_dtype = torch.float32  # of the model's floating inputs: its parameters' dtype after setup()
        self._signal: int | None = None
        # A stop signal that came before train() (during setup: main.py notes it): the first step then saves and stops.
        self.pending_signal: int | None = None
        self._latent_side: int | None = None  # of the training latents, seen on the first batch
        self._epoch_actions_due = False
        self._verdicts: StepVerdicts | None = None  # built by setup(), on the prepared optimizer
        self._stop_requested = False  # a stop signal found in a verdict settled outside _after_step
        self._reset_cycle()
        self._meter = StepMeter()
        self._plain_progress = False

    @property
    def ema(self) -> EMA:
        return self._ema

    @property
    def current_step(self) -> int:
        return self.progress.step

    @property
    def uploader(self) -> HubUploader | None:
        """Uploads checkpoints and sample grids to the Hub (hf_repo_id); the checkpointer's."""
        return self.checkpointer.uploader

    @uploader.setter
    def uploader(self, uploader: HubUploader | None) -> None:
        self.checkpointer.uploader = uploader

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint this trainer saved or loaded."""
        return self.checkpointer.last

    @property
    def save_failures(self) -> int:
        """Periodic saves that failed (training went on)."""
        return self.checkpointer.failures

    def save_checkpoint(self, path: str | Path) -> Path:
        """Save everything needed to resume (and to sample) into directory `path`, atomically: written into
        `path.tmp`, marked COMPLETE, renamed. On failure the .tmp is removed, earlier checkpoints are untouched and
        CheckpointError says what happened; the training state in memory is unchanged either way."""
        return self.checkpointer.save(path, self.progress, self.dataloader)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG (accelerate), EMA and progress from a complete checkpoint.
        Before setup() the load is deferred to setup(); under FSDP2 / ZeRO-3 it must be (resume= in the config)."""
        progress = self.checkpointer.load(path, self.dataloader)
        if progress is not None:
            self.progress = progress

    def setup(self, dataloader: DataLoader, cache: Any = None, sampler: Any = None) -> None:
        """Prepare model, optimizer, scheduler and data with accelerate; start the tracker; resume if configured.

        A map-style dataloader is sharded across processes by accelerate; an iterable (streaming) one must shard itself
        by node and worker (the cache's streaming loader does, with webdataset's split_by_node / split_by_worker).
        `cache` (MultiSourceCache) supplies teacher features for batches that carry none; `sampler` (Sampler built on
        trainer.model and trainer.ema) draws the periodic sample grids.
        """
        acc, cfg, checkpointer = self.accelerator, self.config, self.checkpointer
        resume = checkpointer.to_resume()
        if resume is not None:  # before prepare, while every parameter is whole on every process
            resume = checkpointer.resume_falling_back(resume, checkpointer.load_ema, checkpointer.load_ema)
        workers_ignore_stop_signals(dataloader)  # before prepare, which copies it (the streaming loader has its own)
        # A loader that keeps its own position (the streaming and the bucket loaders) is used as it is; a plain
        # DataLoader goes through accelerate, which shards it, in an EpochLoader, which resumes at the progress.
        self._model, self.optimizer, self.scheduler, self.dataloader = prepare_for_training(
            acc, self.model, self.optimizer, self.scheduler, dataloader, lambda: self.progress
        )
        checkpointer.prepared = self._model
        # FSDP2 shards in place: the parameters are new (DTensor) objects that clipping and the EMA must use.
        self._params = self.model.get_trainable_parameters()
        if self.engine.name == "fsdp2":
            engines.shard_ema(self._ema, self.model)
        self._input_dtype = engines.input_dtype(self.model)
        # The optimizer skips a bad step on the device where it can (one process or DDP: whole parameters, torch's
        # fused AdamW, no fp16 loss scaler): then no step waits for the host to read its verdict.
        # The same step clips the gradients as it reads them (optim.clip_in_fused_step): no pass of its own.
        self._fused_step = self.engine.name in ("single", "ddp") and fused_adam(self.optimizer)
        self._fused_step &= cfg.dtype != torch.float16
        # accelerate's optimizer wrapper adds nothing to such a step (no loss scaler, no XLA) but looks for an optional
        # package on disk twice per call and re-reads zero_grad's signature (~0.1 ms a step, bench/NOTES.md): step the
        # torch optimizer itself there. Elsewhere (fp16's scaler, FSDP2, DeepSpeed) the wrapper does the work.
        self._stepper = torch_optimizer(self.optimizer) if self._fused_step else self.optimizer
        self._verdicts = StepVerdicts(
            self.optimizer, acc.device, deferred=self._fused_step, num_processes=acc.num_processes
        )
        if sampler is not None and self.engine.shards_parameters:
            logger.warning(
                "no sample grids under %s: the sampler needs the whole model in one process. Sample from a "
                "checkpoint instead (its model.safetensors / ema.safetensors are whole): sample.py --model DIR",
                self.engine,
            )
            sampler = None
        self._pad_text = has_compiled_blocks(self.model)  # config.compile_mode, or blocks compiled by the caller
        self.cache, self.sampler = cache, sampler
        if cfg.log_with != "none":
            acc.init_trackers(cfg.run_name, config=hparams(cfg, self.model.config))
        if acc.is_main_process:
            ckpt.clean_stale_tmp(cfg.checkpoint_dir)
        acc.wait_for_everyone()
        if resume is not None:  # a fallback after prepare reloads the older checkpoint's EMA too (weights are whole)
            self.progress = checkpointer.resume_falling_back(
                resume,
                lambda path: checkpointer.load_training_state(path, self.dataloader),
                lambda path: checkpointer.load(path, self.dataloader),
            )
        elif cfg.resume == "latest":
            logger.info("resume=latest: no complete checkpoint in %s yet, starting from scratch", cfg.checkpoint_dir)

    def train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The loss of one micro-batch: {"loss": total (with graph), "main", "lune", "sol": its parts}.

        Samples t (logit-normal + shift), noise and x_t; predicts v = data - noise; adds the Lune / Sol distillation
        losses (weights ramped over their warmups) against the teacher features of the batch or the cache. Per sample:
        text dropout swaps in the null conditioning (conditioning.drop_text: zero T5 states and CLIP pooled, the same
        conditioning the Sampler contrasts with for an empty negative prompt); teacher dropout hides a teacher from the
        conditioning (the model uses its own prediction there) while its distillation loss still counts.
        """
        cfg, device = self.config, self.accelerator.device
        model_cfg = self.model.config
        latents = to_device(batch["latents"], device, torch.float32)  # (B, C, H, W)
        b, _, height, width = latents.shape
        t, noise, keep = self._draws(latents)
        grid = (height // model_cfg.patch_size, width // model_cfg.patch_size)
        x_t = pack_latents(flow_x_t(latents, noise, t), model_cfg.patch_size)  # (B, N, C*p*p)
        v_target = pack_latents(flow_velocity(latents, noise), model_cfg.patch_size)  # (B, N, C*p*p)
        t5, t5_mask = to_device(batch["t5_embeds"], device, torch.float32), to_device(batch["t5_mask"], device)
        # Compiled blocks meet a few text lengths, not one per batch; eager ones gain nothing from it, and padding costs
        # them (bench/NOTES.md, 2026-12-06). The padded regime's text is max_text_tokens long already, unmasked.
        if model_cfg.text_regime == "masked" and self._pad_text:
            t5, t5_mask = pad_text(t5, t5_mask, cfg.text_buckets)  # (B, L', K, D), (B, L')
        t5, t5_mask, pooled = drop_text(  # (B, L', K, D), (B, L'), (B, P)
            t5, t5_mask, to_device(batch["clip_pooled"], device, torch.float32), ~keep["text"]
        )
        teacher = self._teacher(batch, t)
        # The run's autocast: accelerate wraps the prepared forward in it for one process and DDP, not under FSDP2
        # (whose policy only gathers bf16 parameters); nested, it changes nothing. Off under DeepSpeed and float32.
        with self.accelerator.autocast(), whole_graph_errors():
            v_pred, expert = self._model(
                self._input(x_t),
                self._input(t5),
                self._input(pooled),
                t,
                TinyFluxDeep.create_img_ids(b, *grid, device),
                lune_features=self._input(teacher.lune),
                sol_stats=self._input(teacher.sol_stats),
                sol_spatial=self._input(teacher.sol_spatial),
                return_expert_pred=True,
                encoder_attention_mask=t5_mask if model_cfg.text_regime == "masked" else None,
                lune_mask=kept(keep["lune"], teacher.lune_valid) if teacher.lune is not None else None,
                sol_mask=kept(keep["sol"], teacher.sol_valid) if teacher.sol_stats is not None else None,
                img_shape=grid,
            )
        v_pred, expert = v_pred.float(), {k: v.float() for k, v in expert.items()}  # losses in float32, any engine
        spatial = spatial_weights(teacher, expert.get("sol_spatial_pred")) if cfg.use_spatial_weighting else None
        parts = {
            "main": compute_main_loss(
                v_pred,
                v_target,
                spatial_weights=spatial,
                use_huber=cfg.use_huber_loss,
                huber_delta=cfg.huber_delta,
                snr_weights=min_snr_weight(t, cfg.snr_gamma) if cfg.use_snr_weighting else None,
                grid_size=grid,
            )
        }
        loss = parts["main"]
        step = self.progress.step
        if teacher.lune is not None:
            per_sample = compute_lune_loss(expert["lune_pred"], teacher.lune, cfg.lune_mode, reduction="none")
            parts["lune"] = masked_mean(per_sample, teacher.lune_valid)
            loss = loss + get_lune_weight(step, cfg.lune_warmup_steps, cfg.lune_weight) * parts["lune"]
        if teacher.sol_stats is not None:
            per_sample = compute_sol_loss(
                expert["sol_stats_pred"],
                expert["sol_spatial_pred"],
                teacher.sol_stats[:, : model_cfg.sol_num_stats],  # caches hold 4; the released prior reads 3
                teacher.sol_spatial,
                reduction="none",
            )
            parts["sol"] = masked_mean(per_sample, teacher.sol_valid)
            loss = loss + get_sol_weight(step, cfg.sol_warmup_steps, cfg.sol_weight) * parts["sol"]
        parts["loss"] = loss
        return parts

    def _input(self, x: Tensor | None) -> Tensor | None:
        """A floating model input in the parameters' dtype (bf16 under DeepSpeed, which runs the module in bf16)."""
        return x if x is None else x.to(self._input_dtype)

    def _draws(self, latents: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        acc = self.accelerator
        return step_draws(latents, self.config, self.progress.micro_step, acc.process_index, acc.num_processes)

    def _teacher(self, batch: dict[str, Any], t: Tensor) -> Teacher:
        cfg, model_cfg = self.config, self.model.config
        lune = cfg.enable_lune and model_cfg.use_lune_expert
        sol = cfg.enable_sol and model_cfg.use_sol_prior
        return teacher_features(batch, t, self.cache, lune=lune, sol=sol)

    def train(self, epochs: int | None = 1, max_steps: int | None = None) -> ckpt.TrainingProgress:
        """Train until `epochs` epochs of the whole run (None: no epoch limit), total_steps, or `max_steps` more
        optimizer steps in this call, whichever comes first, or until SIGTERM / SIGUSR1; then save a checkpoint
        (unless one was just saved at this step). Returns the progress."""
        if self._model is None:
            raise RuntimeError("call trainer.setup(dataloader, ...) before train()")
        cfg, p = self.config, self.progress
        self.model.train()
        self.stopped_by = None
        # A bar for a terminal; in a job's output file (no tty) _log writes one plain line per log step instead.
        self._plain_progress = not sys.stderr.isatty()
        bar = tqdm(
            total=cfg.total_steps,
            initial=p.step,
            disable=not self.accelerator.is_local_main_process or self._plain_progress,
            desc="train",
        )
        self._meter.reset(p.samples_seen)
        self._stop_at = cfg.total_steps if max_steps is None else min(cfg.total_steps, p.step + max_steps)
        stop = p.step >= self._stop_at
        if self.validator is not None and p.step == 0:  # the starting weights' figure: what training must lower
            self.validator.log(self)
        self._signal, self.pending_signal = self.pending_signal, None
        self._stop_requested = False
        try:
            with stop_signals(self._on_signal):
                while not stop and (epochs is None or p.epoch < epochs):
                    if self._stream_finished_epoch():
                        self._end_epoch()
                        continue
                    seen = 0
                    # closing: a step that raises shuts a per-epoch loader's workers down now, not when the traceback is
                    # collected (the streaming loader's live for the run: closed below)
                    with closing(self._epoch_batches()) as batches:
                        for batch in batches:
                            seen += 1
                            stop = self._micro_step(batch, bar)
                            if stop:
                                break
                        else:
                            if seen == 0 and p.batches_in_epoch == 0:
                                raise RuntimeError(
                                    "the dataloader yielded no batch: is the cache empty, or batch_size too big?"
                                )
                            self._end_epoch()
        finally:
            self.dataloader.close()  # the streaming loader's run-long workers
            clear_step_scales(self.optimizer)  # each step sets its own; none may outlive train() on the optimizer
        bar.close()
        self._settle()
        if self.checkpointer.saved_step != p.step:
            self._save("step", p.step, periodic=False)
        self.accelerator.wait_for_everyone()
        return p

    def _stream_finished_epoch(self) -> bool:
        """After a resume: the stream had already ended this epoch when the checkpoint was taken (its last batch closed
        the step), but the loop never saw the end; the uninterrupted run would close the epoch now."""
        p = self.progress
        return p.batches_in_epoch > 0 and self.dataloader.epoch > p.epoch

    def _on_signal(self, signum: int) -> None:
        """Only a flag: the loop saves at the next step boundary and returns (exit code 0 from the script)."""
        self._signal = signum

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        """This epoch's micro-batches, from where the loader stands (a resume restored its position)."""
        self.dataloader.set_epoch(self.progress.epoch)
        return started(self.dataloader)  # DataLoader workers must ignore the stop signals from their first instant

    def _micro_step(self, batch: dict[str, Any], bar: tqdm) -> bool:
        """One micro-batch; at the end of an accumulation cycle the optimizer step. Returns True to stop."""
        acc = self.accelerator
        if self._latent_side is None:
            check_batch(batch, self.model.config)
            self._latent_side = batch["latents"].shape[-1]
        b = batch["latents"].shape[0]
        with acc.accumulate(self._model):
            parts = self.train_step(batch)
            acc.backward(parts["loss"])
            for name, value in parts.items():
                self._cycle[name] = self._cycle.get(name, 0.0) + value.detach().float()
            self._cycle_micro += 1
            self._count_batch(batch, b)
            if not acc.sync_gradients:
                return False
            if self._fused_step:
                grad_norm = clip_in_fused_step(self.optimizer, self._params, self.config.grad_clip)
            else:  # accelerate's clip (FSDP2, fp16, other optimizers); DeepSpeed clips in its step, reports the norm
                grad_norm = engines.plain_norm(
                    acc.clip_grad_norm_(self._params, self.config.grad_clip or math.inf), acc.device
                )
            flags = self._verdicts.measure(
                self._cycle["loss"],
                grad_norm,
                # fp16's loss scaler skips overflowing steps itself; elsewhere a non-finite gradient is a bad step.
                check_grad=self.config.dtype != torch.float16,
                signal=self._signal is not None,
                reduce=lambda x: acc.reduce(x, "sum"),
            )
            self._verdicts.gate(flags)
            verdict = self._verdicts.push(flags)  # this step's, or on the deferred path the previous one's
            if self._verdicts.deferred or not verdict.bad:
                self._stepper.step()
                self.scheduler.step()
            else:
                if acc.scaler is not None:  # fp16: clipping unscaled the gradients; lower the scale, reset its state
                    acc.scaler.update()
                with warnings.catch_warnings():  # torch warns of a scheduler step without an optimizer step: intended
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`")
                    self.scheduler.step()
            self._stepper.zero_grad(set_to_none=True)
        return self._after_step(flags, verdict, grad_norm, bar)

    def _count_batch(self, batch: dict[str, Any], b: int) -> None:
        p, n = self.progress, self.accelerator.num_processes
        p.micro_step += 1
        p.batches_in_epoch += 1
        p.samples_in_epoch += b * n
        p.samples_seen += b * n
        cfg = self.model.config
        h, w = (side // cfg.patch_size for side in batch["latents"].shape[2:])
        layers = cfg.num_double_layers + cfg.num_single_layers
        text = batch["t5_embeds"].shape[1]
        per_token = self._stream_params.per_token(h * w, text)
        per_sample = flops_per_sample(per_token, h * w, text, layers, cfg.hidden_size)
        self._meter.add_batch(b * n * per_sample)

    def _after_step(self, flags: Tensor, verdict: Flags | None, grad_norm: Tensor | None, bar: tqdm) -> bool:
        """Count the step, update the EMA (not for a bad step: on the device), then act on the verdict the host can read
        now (this step's, or the previous one's on the deferred path). Returns True to stop."""
        cfg, p = self.config, self.progress
        bad = flags[0] > 0 if self._verdicts.deferred else verdict.bad  # on the device / already read
        p.step += 1
        if p.step % cfg.ema_every == 0:
            # A bad step left the weights as they were, so the EMA takes its ordinary update toward them and needs no
            # verdict. Only DeepSpeed (its step runs inside backward) may have applied one: there the EMA skips it.
            skip_ema = self.engine.name == "deepspeed" and verdict.bad
            with engines.whole_parameters(self.model, self.engine):
                self._ema.update(self.model, skip=skip_ema)
        self._meter.add_step({k: v / self._cycle_micro for k, v in self._cycle.items()}, grad_norm, skip=bad)
        bar.update(1)
        self._reset_cycle()
        stop = book(p, verdict, p.step - self._verdicts.deferred, cfg.max_nan_steps, self.last_checkpoint)
        # One process needs no agreement on when to stop: it acts on its own signal at once.
        stop = stop or (self._signal is not None and self.accelerator.num_processes == 1)
        self._periodic_actions(bar)
        if self._epoch_actions_due:
            self._epoch_actions()
        stop = stop or self._stop_requested
        if stop:
            self.stopped_by = signal.Signals(self._signal).name if self._signal is not None else "signal"
            path = self._save("step", p.step, periodic=False)
            logger.warning("%s received: saved %s at step %d, stopping cleanly", self.stopped_by, path, p.step)
            return True
        return p.step >= self._stop_at

    def _save(self, kind: str, index: int, periodic: bool = True) -> Path | None:
        """Checkpoint kind_index, keeping the newest N; a periodic save that fails is logged and training goes on."""
        self._settle()  # a checkpoint's progress books every verdict up to its step
        return self.checkpointer.save_numbered(kind, index, self.progress, self.dataloader, periodic)

    def _settle(self) -> None:
        """Book the verdict still pending on the deferred path (before a checkpoint records the progress)."""
        if self._verdicts is not None:
            cfg, p = self.config, self.progress
            self._stop_requested |= book(p, self._verdicts.settle(), p.step, cfg.max_nan_steps, self.last_checkpoint)

    def _periodic_actions(self, bar: tqdm) -> None:
        cfg, step = self.config, self.progress.step
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            self._log(bar)
        if self.validator is not None and (step % cfg.validation_every == 0 or step == cfg.total_steps):
            self.validator.log(self)  # before a save at this step, whose progress then holds the best step
        upload_due = self.uploader is not None and cfg.upload_every_steps and step % cfg.upload_every_steps == 0
        saved = None
        if (cfg.save_every_steps and step % cfg.save_every_steps == 0) or upload_due:
            saved = self._save("step", step)
        if saved is not None and self.uploader is not None and (upload_due or not cfg.upload_every_steps):
            self.checkpointer.upload(saved, step)
        if self.sampler is not None and cfg.sample_every and step % cfg.sample_every == 0:
            self._sample()

    def _end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batches_in_epoch = 0
        self.progress.samples_in_epoch = 0
        # A prepared loader closes the accumulation cycle with its last batch; a streaming one may end mid-cycle, and a
        # checkpoint is only consistent between optimizer steps, so the epoch's save then waits for the next step.
        self._epoch_actions_due = True
        if self._cycle_micro == 0:
            self._epoch_actions()

    def _epoch_actions(self) -> None:
        cfg, epoch = self.config, self.progress.epoch
        self._epoch_actions_due = False
        upload_due = self.uploader is not None and cfg.upload_every_epochs and epoch % cfg.upload_every_epochs == 0
        if (cfg.save_every_epochs and epoch % cfg.save_every_epochs == 0) or upload_due:
            saved = self._save("epoch", epoch)
            if saved is not None and self.uploader is not None and (upload_due or not cfg.upload_every_epochs):
                self.checkpointer.upload(saved, self.progress.step)

    def _reset_cycle(self) -> None:
        self._cycle: dict[str, Tensor] = {}
        self._cycle_micro = 0

    def _log(self, bar: tqdm) -> None:
        """Mean loss parts since the last log (averaged over processes), grad norm, lr, samples/s, MFU, peak memory."""
        acc, cfg, p = self.accelerator, self.config, self.progress
        reduce = (lambda x: acc.reduce(x, "mean")) if acc.num_processes > 1 else (lambda x: x)
        values = self._meter.summary(p.samples_seen, reduce)
        if not values:
            return
        flops = values.pop("flops_per_sample")
        values.update(
            {
                "lr": self.scheduler.get_last_lr()[0],
                "epoch": p.epoch,
                "nan_steps": p.nan_steps,
                "weight/lune": get_lune_weight(p.step, cfg.lune_warmup_steps, cfg.lune_weight),
                "weight/sol": get_sol_weight(p.step, cfg.sol_warmup_steps, cfg.sol_weight),
            }
        )
        peak = cfg.peak_tflops or device_peak_tflops(acc.device)
        if peak:
            values["mfu"] = mfu(flops, values["samples_per_sec"], acc.num_processes, peak)
        if acc.device.type == "cuda":  # what the engines trade against each other: the main process's peak
            values["memory/peak_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        acc.log(values, step=p.step)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", sps=f"{values['samples_per_sec']:.1f}")
        if self._plain_progress and acc.is_main_process:
            logger.info(
                "step %d/%d loss=%.4f lr=%.1e samples/s=%.0f",
                p.step,
                cfg.total_steps,
                values["loss"],
                values["lr"],
                values["samples_per_sec"],
            )
        self._meter.reset(p.samples_seen)

    def _sample(self) -> None:
        """A sample grid from the EMA weights (main process only); a failure is logged, never fatal."""
        if not self.accelerator.is_main_process:
            return
        cfg, step = self.config, self.progress.step
        prompts = cfg.sample_prompts or ["a photo of a cat", "a red car on a street"]
        size = cfg.sample_size or self._latent_side or 64
        # On aspect buckets (and no --sample_size): each prompt square, landscape and portrait, at the buckets' shapes;
        # on one shape (a streamed cache, or a --resolution_schedule's current set), at that shape
        buckets = self.dataloader.bucket_shapes
        shapes = sample_shapes(buckets) if buckets and cfg.sample_size is None else [(size, size)]
        # A model compiled whole compiles a new graph for each sample shape and CFG batch (minutes at `deep`, more than
        # the grid takes eager): its grids run eager. Compiled blocks recompile in seconds and keep their speed.
        stance = torch.compiler.set_stance("force_eager") if compiled_whole(self.model) else nullcontext()
        try:
            with stance:
                grid = self.sampler.save_grid(
                    prompts,
                    shapes,
                    cfg.sample_dir,
                    step=step,
                    num_steps=cfg.sample_steps,
                    guidance_scale=cfg.sample_guidance_scale,
                    seed=cfg.seed,
                    use_ema=True,
                )
        except Exception:
            logger.exception("sample grid at step %d failed (training goes on)", step)
            return
        finally:
            self.model.train()
        logger.info("sample grid: %s", grid)
        log_sample_grid(self.accelerator, grid, step)
        if self.uploader is not None:
            self.uploader.upload_samples(grid, step)

    def finish(self, upload_timeout: float | None = None) -> None:
        """End of the run: wait for Hub uploads (up to upload_timeout seconds) and close the trackers."""
        if self.uploader is not None and self.uploader.pending:
            logger.info("waiting for %d Hub upload(s)", self.uploader.pending)
            self.uploader.wait(upload_timeout)
        self.accelerator.end_training()
