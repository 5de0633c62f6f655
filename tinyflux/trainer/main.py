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
from tinyflux.trainer.config import TrainerConfigError
from tinyflux.trainer.folder import prepare_folder_cache
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


def model_config_for(args: RunArgs) -> TinyFluxConfig:
    """The architecture to build: a resumed checkpoint's own (the only one its state fits), else what args say."""
    path = ckpt.resolve_resume(args.trainer.resume, args.trainer.checkpoint_dir)
    if path is None:
        return args.model_config
    saved = load_config(str(path))
    if saved != args.model_config:
        logger.warning("resuming %s: using its architecture, not the one --model / model flags describe", path)
    return saved


def build_model(args: RunArgs, config: TinyFluxConfig) -> TinyFluxDeep:
    """A fresh model, or the weights of the checkpoint --model names ("start from": fine-tuning, optimizer anew).
    A LoRA run's checkpoints hold only the adapter: its base is loaded from --model on resume too."""
    source = args.script.model
    resumed = config is not args.model_config and not args.trainer.is_lora
    if source in PRESETS or source.endswith(".json") or resumed:
        return TinyFluxDeep(config)  # fresh, or about to be overwritten by the resumed state
    return load_model(source, config=config, device="cpu", dtype=torch.float32)


def held_out_split(args: RunArgs) -> list[list[int]] | None:
    """Per --cache set, the sample indices --validation_fraction keeps out of training (None without a split)."""
    fraction = args.script.validation_fraction
    if fraction is None:
        return None
    try:
        return [held_out_indices(load_manifest(d).num_samples, fraction) for d in args.script.cache]
    except ValueError as e:
        raise ArgsError(f"--validation_fraction: {e}") from None


def build_validator(args: RunArgs, config: TinyFluxConfig, held_out: list[list[int]] | None) -> Validator | None:
    """The held-out samples of --validation_cache or of the --validation_fraction split (each cache once, however
    often --repeats lists it), at most --validation_samples of them."""
    script, cfg = args.script, args.trainer
    limit = script.validation_samples
    if script.validation_cache is not None:
        check_compatible(load_manifest(script.validation_cache), config, where="--validation_cache")
        samples = read_samples(script.validation_cache, None, limit)
    elif held_out is not None:
        samples, seen = [], set()
        for dataset_id, (cache_dir, indices) in enumerate(zip(script.cache, held_out, strict=True)):
            if cache_dir not in seen and len(samples) < limit:
                seen.add(cache_dir)
                samples += read_samples(cache_dir, indices, limit - len(samples), dataset_id)
    else:
        return None
    logger.info("validation loss on %d held-out samples every %d steps", len(samples), cfg.validation_every)
    return Validator(samples, cfg.batch_size, cfg.validation_timesteps)


def build_dataloader(args: RunArgs, config: TinyFluxConfig, held_out: list[list[int]] | None = None) -> Any:
    """The --cache shard sets, each checked against the model config: streamed and mixed by --cache_weights, or with
    --in_memory loaded into RAM behind a shuffling DataLoader that accelerate shards across processes; without the
    `held_out` samples of each set."""
    caches = args.script.cache
    if not caches:
        raise ArgsError("no training data: pass --cache DIR [DIR ...] (directories written by build_cache.py)")
    for cache_dir in caches:
        if is_remote(cache_dir):
            if args.script.in_memory:
                raise ArgsError(f"--cache {cache_dir}: --in_memory loads local caches; stream a remote one (drop it)")
        elif not Path(cache_dir).is_dir():
            raise ArgsError(
                f"--cache {cache_dir}: not a directory; pass a cache directory written by build_cache.py, or its URL "
                "(https://host/cache/, s3://bucket/cache/, 'pipe:COMMAND {name}')"
            )
    if not args.script.in_memory:
        return build_stream_loader(args, config, held_out)
    manifests = [load_manifest(d) for d in caches]
    for cache_dir, manifest in zip(caches, manifests, strict=True):
        check_compatible(manifest, config, where=f"cache {cache_dir}")
    shapes = {(b["height"], b["width"]) for m in manifests for b in manifest_buckets(m) if b["count"]}
    if len(shapes) > 1 or any(m.buckets for m in manifests):  # buckets, or several resolutions: a shape a batch
        return build_bucket_loader(args, config, held_out)
    datasets: list[Any] = [data.CachedDataset(DatasetCache.from_shards(d), dataset_id=i) for i, d in enumerate(caches)]
    if held_out is not None:
        datasets = [Subset(ds, sorted(set(range(len(ds))) - set(h))) for ds, h in zip(datasets, held_out, strict=True)]
    return DataLoader(
        ConcatDataset(datasets),
        batch_size=args.trainer.batch_size,
        shuffle=True,
        num_workers=args.trainer.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=torch.cuda.is_available(),  # accelerate then copies each batch to the GPU without blocking
        worker_init_fn=WorkerInit(),  # a stop signal to the process group is the main process's to handle
    )


def build_stream_loader(
    args: RunArgs, model_config: TinyFluxConfig, held_out: Sequence[Sequence[int]] | None = None
) -> Any:
    """make_stream_loader from train_tinyflux.py's parsed arguments (args.script.cache / cache_weights, args.trainer's
    batch_size, num_workers, shuffle_buffer, seed): one pass per epoch, checked against `model_config`, without the
    `held_out` samples of each cache. With --resolution_schedule, a ScheduledLoader over one stream per cache set."""
    script = args.script
    if getattr(script, "resolution_schedule", None) is None:
        return _stream_loader(args, model_config, script.cache, script.cache_weights or None, held_out)
    loaders = [
        _stream_loader(args, model_config, [cache], None, None if held_out is None else [held_out[i]])
        for i, cache in enumerate(script.cache)
    ]
    return ScheduledLoader(loaders, parse_resolution_schedule(script.resolution_schedule, script.cache))


def _stream_loader(
    args: RunArgs,
    model_config: TinyFluxConfig,
    caches: Sequence[str],
    weights: Sequence[float] | None,
    held_out: Sequence[Sequence[int]] | None,
) -> data.StreamingLoader:
    script, trainer = args.script, args.trainer
    # Batches in the caches' storage dtype (float16 / bfloat16) are exact and half the bytes of float32 to collate,
    # pin and copy; the trainer casts them on the device. Caches stored in different dtypes meet in float32.
    stored = {CacheLocation.of(d).manifest().storage_dtype for d in caches}
    return data.make_stream_loader(
        caches,
        weights,
        batch_size=trainer.batch_size,
        num_workers=trainer.num_workers,
        seed=trainer.seed,
        shuffle_buffer=trainer.shuffle_buffer,
        model_config=model_config,
        pin_memory=torch.cuda.is_available(),
        dtype=parse_dtype(stored.pop()) if len(stored) == 1 else torch.float32,
        verify_shards=trainer.verify_shards,
        held_out=held_out,
        bucket_batch=getattr(script, "bucket_batch", "samples"),
    )


def build_bucket_loader(args: RunArgs, config: TinyFluxConfig, held_out: list[list[int]] | None = None) -> Any:
    """--in_memory on caches of aspect buckets: every batch one bucket (BucketLoader), `--bucket_batch` samples or
    tokens per batch, this process's share of each epoch's batches."""
    parts = [BucketSamples(d, dataset_id=i) for i, d in enumerate(args.script.cache)]
    kept = [sorted(set(range(len(p))) - set(held_out[i] if held_out else ())) for i, p in enumerate(parts)]
    dataset = ConcatDataset([Subset(p, k) for p, k in zip(parts, kept, strict=True)])
    shapes = [p.shapes[i] for p, k in zip(parts, kept, strict=True) for i in k]
    square = parts[0].resolution // VAE_DOWNSAMPLE
    sizes = bucket_batch_sizes(shapes, args.trainer.batch_size, args.script.bucket_batch, square, config.patch_size)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logger.info(
        "aspect buckets (latent h x w: batch size): %s", ", ".join(f"{h}x{w}: {n}" for (h, w), n in sizes.items())
    )
    return BucketLoader(
        dataset,
        BucketBatchSampler(shapes, sizes, seed=args.trainer.seed, rank=rank, world_size=world),
        data.collate_fn,
        num_workers=args.trainer.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def build_sampler(args: RunArgs, trainer: Trainer) -> Any:
    """A Sampler on the trainer's model and EMA for the periodic grids (main process, when --zoo is given; not under
    FSDP2 / ZeRO-3, where no process holds the whole model)."""
    cfg = args.trainer
    if args.script.zoo is None or cfg.sample_every is None or not trainer.accelerator.is_main_process:
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
    where: dict[str, Any] = {} if args.script.zoo == "hub" else {"zoo": args.script.zoo}
    zoo = ModelZoo(device=device, dtype=cfg.dtype, t5_layers=trainer.model.config.t5_layers, **where)
    return Sampler(zoo, trainer.model, trainer.ema, device=device, dtype=cfg.dtype, shift=cfg.shift)


def run_training(args: RunArgs) -> Trainer:
    """Build everything from parsed arguments, train, wait for Hub uploads. Returns the Trainer: .last_checkpoint is
    the final checkpoint directory, .progress the counters, .stopped_by the signal that ended the run (or None)."""
    set_seed(args.trainer.seed)  # the model init; the training draws have their own seeded generators
    early: list[int] = []  # SIGTERM / SIGUSR1 while setting up (SLURM's come at any time): stop after one step
    with stop_signals(early.append):
        config = model_config_for(args)
        if args.script.images is not None:  # the folder's cache, built or reused; --repeats lists it that often
            folder_cache = prepare_folder_cache(args.script, config, args.trainer.ddp_timeout)
            args.script.cache = [str(folder_cache)] * args.script.repeats
        held_out = held_out_split(args)
        loader = build_dataloader(args, config, held_out)  # first: a cache that does not fit fails before anything
        validator = build_validator(args, config, held_out)
        trainer = Trainer(build_model(args, config), args.trainer)
        if trainer.lora is not None:  # adapter_config.json names the base its adapter was trained on
            trainer.model.peft_config[ADAPTER_NAME].base_model_name_or_path = args.script.model
        trainer.validator = validator
        if isinstance(loader, ScheduledLoader):  # a --resolution_schedule switches cache sets by the run's step
            loader.follow_steps(lambda: trainer.progress.step)
        trainer.setup(loader, sampler=build_sampler(args, trainer))
    trainer.pending_signal = early[0] if early else None
    trainer.train(epochs=args.script.epochs)
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
