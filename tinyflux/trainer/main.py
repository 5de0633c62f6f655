"""The training run behind train_tinyflux.py: parsed arguments -> model, Trainer, data, sampler -> train.

`main(argv)` is the script (exit code 0 on success and on a clean stop by SIGTERM / SIGUSR1, 1 when the run fails
with one of TinyFlux's own errors, 2 on a bad command line); `run_training(args)` does the same in-process and returns
the Trainer (the demo calls it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import ConcatDataset, DataLoader, Subset

from tinyflux.cache import loaders as data
from tinyflux.cache.bucket_loader import BucketBatchSampler, BucketLoader, BucketSamples, bucket_batch_sizes
from tinyflux.cache.buckets import manifest_buckets
from tinyflux.cache.format import check_compatible, load_manifest
from tinyflux.cache.memory import DatasetCache
from tinyflux.cache.source import CacheLocation, is_remote
from tinyflux.errors import TinyFluxError, message
from tinyflux.frozen.sources import VAE_DOWNSAMPLE, ZooError
from tinyflux.model.config import PRESETS, ConfigError, TinyFluxConfig
from tinyflux.model.loader import LoadError, load_config, load_model
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.args import ArgsError, RunArgs, parse_args
from tinyflux.trainer.config import TrainerConfig, TrainerConfigError
from tinyflux.trainer.lora import ADAPTER_NAME
from tinyflux.trainer.resolution_schedule import ScheduledLoader, parse_resolution_schedule
from tinyflux.trainer.runtime import WorkerInit, stop_signals
from tinyflux.trainer.trainer import Trainer
from tinyflux.trainer.validation import Validator, held_out_indices, read_samples
from tinyflux.util.dtypes import parse_dtype

logger = logging.getLogger("tinyflux.train")

# Errors that already say what is wrong and how to fix it: main() prints them as one line, without a traceback.
# tinyflux.model's errors do not derive from TinyFluxError yet (that package is owned elsewhere): listed by name.
RUN_ERRORS = (TinyFluxError, ConfigError, LoadError, ZooError)
# Bad input rather than a failed run: exit code 2, like argparse.
USAGE_ERRORS = (ArgsError, TrainerConfigError)


def model_config_for(resume: str | None, checkpoint_dir: str, model_config: TinyFluxConfig) -> TinyFluxConfig:
    """The architecture to build: the checkpoint's that `resume` names (the only one its state fits), else
    `model_config` (what --model and the model flags describe)."""
    path = ckpt.resolve_resume(resume, checkpoint_dir)
    if path is None:
        return model_config
    saved = load_config(str(path))
    if saved != model_config:
        logger.warning("resuming %s: using its architecture, not the one --model / model flags describe", path)
    return saved


def build_model(source: str, config: TinyFluxConfig, *, resumed: bool, lora: bool) -> TinyFluxDeep:
    """A fresh model, or the weights of the checkpoint `source` (--model) names ("start from": fine-tuning, optimizer
    anew). `resumed`: the run resumes a checkpoint, whose state overwrites the weights; but a LoRA run's (`lora`)
    checkpoints hold only the adapter, so its base is loaded from `source` on resume too."""
    if source in PRESETS or source.endswith(".json") or (resumed and not lora):
        return TinyFluxDeep(config)  # fresh, or about to be overwritten by the resumed state
    return load_model(source, config=config, device="cpu", dtype=torch.float32)


def held_out_split(caches: Sequence[str], fraction: float | None) -> list[list[int]] | None:
    """Per cache set, the sample indices --validation_fraction `fraction` keeps out of training (None without one)."""
    if fraction is None:
        return None
    try:
        return [held_out_indices(load_manifest(d).num_samples, fraction) for d in caches]
    except ValueError as e:
        raise ArgsError(f"--validation_fraction: {e}") from None


def build_validator(
    caches: Sequence[str],
    config: TinyFluxConfig,
    cfg: TrainerConfig,
    *,
    validation_cache: str | None,
    max_samples: int,
    held_out: Sequence[Sequence[int]] | None = None,
) -> Validator | None:
    """The held-out samples of `validation_cache` or of the `held_out` split of `caches` (each cache once, however
    often --repeats lists it), at most `max_samples` (--validation_samples) of them; None without either."""
    if validation_cache is not None:
        check_compatible(load_manifest(validation_cache), config, where="--validation_cache")
        samples = read_samples(validation_cache, None, max_samples)
    elif held_out is not None:
        samples, seen = [], set()
        for dataset_id, (cache_dir, indices) in enumerate(zip(caches, held_out, strict=True)):
            if cache_dir not in seen and len(samples) < max_samples:
                seen.add(cache_dir)
                samples += read_samples(cache_dir, indices, max_samples - len(samples), dataset_id)
    else:
        return None
    logger.info("validation loss on %d held-out samples every %d steps", len(samples), cfg.validation_every)
    return Validator(samples, cfg.batch_size, cfg.validation_timesteps)


def build_dataloader(
    caches: Sequence[str],
    config: TinyFluxConfig,
    cfg: TrainerConfig,
    *,
    in_memory: bool = False,
    weights: Sequence[float] | None = None,
    bucket_batch: str = "samples",
    resolution_schedule: str | None = None,
    held_out: Sequence[Sequence[int]] | None = None,
) -> Any:
    """The `caches` shard sets (--cache), each checked against the model config: streamed and mixed by `weights`, or
    with `in_memory` loaded into RAM behind a shuffling DataLoader that accelerate shards across processes; without the
    `held_out` samples of each set. `cfg`: batch_size, num_workers, seed, shuffle_buffer, verify_shards."""
    if not caches:
        raise ArgsError("no training data: pass --cache DIR [DIR ...] (directories written by build_cache.py)")
    for cache_dir in caches:
        if is_remote(cache_dir):
            if in_memory:
                raise ArgsError(f"--cache {cache_dir}: --in_memory loads local caches; stream a remote one (drop it)")
        elif not Path(cache_dir).is_dir():
            raise ArgsError(
                f"--cache {cache_dir}: not a directory; pass a cache directory written by build_cache.py, or its URL "
                "(https://host/cache/, s3://bucket/cache/, 'pipe:COMMAND {name}')"
            )
    if not in_memory:
        return build_stream_loader(
            caches,
            config,
            cfg,
            weights=weights,
            bucket_batch=bucket_batch,
            resolution_schedule=resolution_schedule,
            held_out=held_out,
        )
    manifests = [load_manifest(d) for d in caches]
    for cache_dir, manifest in zip(caches, manifests, strict=True):
        check_compatible(manifest, config, where=f"cache {cache_dir}")
    shapes = {(b["height"], b["width"]) for m in manifests for b in manifest_buckets(m) if b["count"]}
    if len(shapes) > 1 or any(m.buckets for m in manifests):  # buckets, or several resolutions: a shape a batch
        return build_bucket_loader(caches, config, cfg, bucket_batch=bucket_batch, held_out=held_out)
    datasets: list[Any] = [data.CachedDataset(DatasetCache.from_shards(d), dataset_id=i) for i, d in enumerate(caches)]
    if held_out is not None:
        datasets = [Subset(ds, sorted(set(range(len(ds))) - set(h))) for ds, h in zip(datasets, held_out, strict=True)]
    return DataLoader(
        ConcatDataset(datasets),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=torch.cuda.is_available(),  # accelerate then copies each batch to the GPU without blocking
        worker_init_fn=WorkerInit(),  # a stop signal to the process group is the main process's to handle
    )


def build_stream_loader(
    caches: Sequence[str],
    config: TinyFluxConfig,
    cfg: TrainerConfig,
    *,
    weights: Sequence[float] | None = None,
    bucket_batch: str = "samples",
    resolution_schedule: str | None = None,
    held_out: Sequence[Sequence[int]] | None = None,
) -> Any:
    """make_stream_loader on the `caches` mixed by `weights` (None or empty: equally), with `cfg`'s batch_size,
    num_workers, seed, shuffle_buffer and verify_shards: one pass per epoch, checked against `config`, without the
    `held_out` samples of each cache. With a `resolution_schedule`, a ScheduledLoader over one stream per cache set."""
    if resolution_schedule is None:
        return _stream_loader(
            caches, config, cfg, weights=weights or None, bucket_batch=bucket_batch, held_out=held_out
        )
    loaders = [
        _stream_loader(
            [cache],
            config,
            cfg,
            weights=None,
            bucket_batch=bucket_batch,
            held_out=None if held_out is None else [held_out[i]],
        )
        for i, cache in enumerate(caches)
    ]
    return ScheduledLoader(loaders, parse_resolution_schedule(resolution_schedule, caches))


def _stream_loader(
    caches: Sequence[str],
    config: TinyFluxConfig,
    cfg: TrainerConfig,
    *,
    weights: Sequence[float] | None,
    bucket_batch: str,
    held_out: Sequence[Sequence[int]] | None,
) -> data.StreamingLoader:
    # Batches in the caches' storage dtype (float16 / bfloat16) are exact and half the bytes of float32 to collate,
    # pin and copy; the trainer casts them on the device. Caches stored in different dtypes meet in float32.
    stored = {CacheLocation.of(d).manifest().storage_dtype for d in caches}
    return data.make_stream_loader(
        caches,
        weights,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        model_config=config,
        pin_memory=torch.cuda.is_available(),
        dtype=parse_dtype(stored.pop()) if len(stored) == 1 else torch.float32,
        verify_shards=cfg.verify_shards,
        held_out=held_out,
        bucket_batch=bucket_batch,
    )


def build_bucket_loader(
    caches: Sequence[str],
    config: TinyFluxConfig,
    cfg: TrainerConfig,
    *,
    bucket_batch: str = "samples",
    held_out: Sequence[Sequence[int]] | None = None,
) -> Any:
    """In-memory `caches` of aspect buckets: every batch one bucket (BucketLoader), `bucket_batch` ("samples" or
    "tokens") per batch, this process's share of each epoch's batches."""
    parts = [BucketSamples(d, dataset_id=i) for i, d in enumerate(caches)]
    kept = [sorted(set(range(len(p))) - set(held_out[i] if held_out else ())) for i, p in enumerate(parts)]
    dataset = ConcatDataset([Subset(p, k) for p, k in zip(parts, kept, strict=True)])
    shapes = [p.shapes[i] for p, k in zip(parts, kept, strict=True) for i in k]
    square = parts[0].resolution // VAE_DOWNSAMPLE
    sizes = bucket_batch_sizes(shapes, cfg.batch_size, bucket_batch, square, config.patch_size)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logger.info(
        "aspect buckets (latent h x w: batch size): %s", ", ".join(f"{h}x{w}: {n}" for (h, w), n in sizes.items())
    )
    return BucketLoader(
        dataset,
        BucketBatchSampler(shapes, sizes, seed=cfg.seed, rank=rank, world_size=world),
        data.collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def build_sampler(zoo: str | None, trainer: Trainer) -> Any:
    """A Sampler on the trainer's model and EMA for the periodic grids, its encoders from `zoo` (--zoo: a zoo directory
    or "hub"; None: no grids). Main process only; not under FSDP2 / ZeRO-3, where no process holds the whole model."""
    cfg = trainer.config
    if zoo is None or cfg.sample_every is None or not trainer.accelerator.is_main_process:
        return None
    if trainer.engine.shards_parameters:
        logger.warning(
            "--zoo: no sample grids under %s (no process holds the whole model); sample from a checkpoint with "
            "sample.py --model CHECKPOINT_DIR",
            trainer.engine,
        )
        return None
    from tinyflux.frozen.zoo import ModelZoo
    from tinyflux.sampling.sampler import Sampler

    device = str(trainer.accelerator.device)
    where: dict[str, Any] = {} if zoo == "hub" else {"zoo": zoo}
    encoders = ModelZoo(device=device, dtype=cfg.dtype, t5_layers=trainer.model.config.t5_layers, **where)
    return Sampler(encoders, trainer.model, trainer.ema, device=device, dtype=cfg.dtype, shift=cfg.shift)


def run_training(args: RunArgs) -> Trainer:
    """Build everything from parsed arguments, train, wait for Hub uploads. Returns the Trainer: .last_checkpoint is
    the final checkpoint directory, .progress the counters, .stopped_by the signal that ended the run (or None)."""
    script, cfg = args.script, args.trainer
    set_seed(cfg.seed)  # the model init; the training draws have their own seeded generators
    early: list[int] = []  # SIGTERM / SIGUSR1 while setting up (SLURM's come at any time): stop after one step
    with stop_signals(early.append):
        config = model_config_for(cfg.resume, cfg.checkpoint_dir, args.model_config)
        caches = script.cache
        if script.images is not None:  # the folder's cache, built or reused; --repeats lists it that often
            # Here, not at the top: only --images runs load the cache builder and the encoders' code.
            from tinyflux.trainer.folder import ImageFolder, prepare_folder_cache

            folder = ImageFolder(script.images, script.resolution, script.zoo, script.cache_dir, script.buckets)
            caches = [str(prepare_folder_cache(folder, config, cfg.ddp_timeout))] * script.repeats
        held_out = held_out_split(caches, script.validation_fraction)
        loader = build_dataloader(  # first: a cache that does not fit fails before anything
            caches,
            config,
            cfg,
            in_memory=script.in_memory,
            weights=script.cache_weights,
            bucket_batch=script.bucket_batch,
            resolution_schedule=script.resolution_schedule,
            held_out=held_out,
        )
        validator = build_validator(
            caches,
            config,
            cfg,
            validation_cache=script.validation_cache,
            max_samples=script.validation_samples,
            held_out=held_out,
        )
        resumed = config is not args.model_config  # model_config_for found a checkpoint to resume
        trainer = Trainer(build_model(script.model, config, resumed=resumed, lora=cfg.is_lora), cfg)
        if trainer.lora is not None:  # adapter_config.json names the base its adapter was trained on
            trainer.model.peft_config[ADAPTER_NAME].base_model_name_or_path = script.model
        trainer.validator = validator
        if isinstance(loader, ScheduledLoader):  # a --resolution_schedule switches cache sets by the run's step
            loader.follow_steps(lambda: trainer.progress.step)
        trainer.setup(loader, sampler=build_sampler(script.zoo, trainer))
    trainer.pending_signal = early[0] if early else None
    trainer.train(epochs=script.epochs)
    trainer.finish()
    if trainer.accelerator.is_main_process:  # once per run, not once per process
        if trainer.stopped_by:
            logger.info(
                "stopped by %s at step %d; continue with --resume latest", trainer.stopped_by, trainer.current_step
            )
        logger.info("final checkpoint: %s", trainer.last_checkpoint)
    return trainer


def main(argv: list[str] | None = None) -> int:
    # One voice per job: the main process logs INFO; the other ranks (RANK, set by torchrun) only warnings and errors,
    # marked with their rank, so a multi-node job's output carries each line once.
    # TINYFLUX_LOG_ALL_RANKS=1 lets every rank log INFO (debugging one rank of a multi-node job).
    rank = int(os.environ.get("RANK", "0"))
    every_rank = os.environ.get("TINYFLUX_LOG_ALL_RANKS") == "1"
    logging.basicConfig(
        level=logging.INFO if rank == 0 or every_rank else logging.WARNING,
        format=f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file of every checkpoint otherwise
    try:
        args = parse_args(argv)
        run_training(args)
    except USAGE_ERRORS as e:
        print(f"train_tinyflux.py: error: {message(e)}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        logger.error("%s: %s", type(e).__name__, message(e))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
