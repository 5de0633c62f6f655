"""Samples/s the streaming reader (tinyflux.trainer.data.make_stream_loader) delivers with N DataLoader workers, from
synthetic shards of the `deep` preset's sample shapes (fp16 on disk, as build_cache.py writes them), against what the
training step consumes. Prints one table; the issue's target is a reader at least 5x the step.

    python bench/bench_stream.py                                   # 256 and 512 px, workers 0 1 2, target step rates
    python bench/bench_stream.py --workers 0 2 4 8 --measure_step  # GPU: the step rate measured by bench_train.py

The step rate (the peer column) is --step_rate when given; with --measure_step the Trainer step measured on this
device by bench_train.run_trainer at the same preset, batch and size; otherwise the issue's target, 300 samples/s at
256 px, scaled to other sizes by the training FLOPs per sample. Batches are counted once they reach the training
process (pinned when CUDA is available, as train_tinyflux.py pins them); the first batches, which carry the worker
start-up, are not timed. A timed round is one pass over the cache by default, so it reads and decodes every sample
once, as a long run over a large cache does per sample.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from itertools import islice

import torch
from common import (
    PRESET_CHOICES,
    Row,
    add_device_args,
    describe_device,
    make_config,
    matmul_ceiling_tflops,
    print_table,
    scratch_dir,
    setup_device,
    train_flops_per_sample,
    write_synthetic_shards,
)

from tinyflux.model.config import TinyFluxConfig
from tinyflux.trainer.data import make_stream_loader
from tinyflux.util.dtypes import parse_dtype

TARGET_SAMPLES_PER_S = 300.0  # the Trainer-step target at 256 px (latent 32), deep preset, one H100
TARGET_LATENT = 32


def reader_rate(
    cache_dir: str,
    cfg: TinyFluxConfig,
    batch: int,
    workers: int,
    batches: int,
    skip: int,
    dtype: torch.dtype,
    pin: bool,
    rounds: int,
    verify: bool = True,
) -> float:
    """Samples/s the stream yields to the training process, fastest of `rounds` windows of `batches` batches after
    `skip` start-up batches (an infinite stream: no epoch ends)."""
    loader = make_stream_loader(
        cache_dir,
        batch_size=batch,
        num_workers=workers,
        seed=0,
        rank=0,
        world_size=1,
        infinite=True,
        model_config=cfg,
        pin_memory=pin,
        dtype=dtype,
        verify_shards=verify,
    )
    stream = iter(loader)
    for _ in islice(stream, skip):
        pass
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        count = sum(b["latents"].shape[0] for b in islice(stream, batches))
        best = max(best, count / (time.perf_counter() - start))
    return best


def first_pass_rate(
    cache_dir: str, cfg: TinyFluxConfig, batch: int, workers: int, dtype: torch.dtype, pin: bool, verify: bool
) -> float:
    """Samples/s of one whole pass from a fresh loader, start-up, shuffle-buffer fill and (verify) the hash of every
    shard included: the pass that pays for shard verification (later passes of the run skip hashed shards)."""
    loader = make_stream_loader(
        cache_dir, batch_size=batch, num_workers=workers, seed=0, rank=0, world_size=1, model_config=cfg,
        pin_memory=pin, dtype=dtype, verify_shards=verify,
    )  # fmt: skip
    start = time.perf_counter()
    count = sum(b["latents"].shape[0] for b in loader)
    return count / (time.perf_counter() - start)


def pass_start_waits(
    cache_dir: str,
    cfg: TinyFluxConfig,
    batch: int,
    workers: int,
    dtype: torch.dtype,
    pin: bool,
    step_s: float,
    passes: int,
) -> tuple[float, float]:
    """(seconds the step waits for the first batch of a pass, median wait for any other batch), best over passes
    2.. of one loader whose consumer spends `step_s` per batch (a sleep, as a step on another device would): what the
    training loop sees between epochs, start-up of the first pass excluded."""
    loader = make_stream_loader(
        cache_dir, batch_size=batch, num_workers=workers, seed=0, rank=0, world_size=1, model_config=cfg,
        pin_memory=pin, dtype=dtype,
    )  # fmt: skip
    first, others = [], []
    for p in range(passes):
        waits = []
        start = time.perf_counter()
        for _ in loader:
            waits.append(time.perf_counter() - start)
            time.sleep(step_s)
            start = time.perf_counter()
        if p:
            first.append(waits[0])
            others += waits[1:]
    loader.close()
    return min(first), statistics.median(others)


def step_rate(
    args: argparse.Namespace, cfg: TinyFluxConfig, latent: int, device: torch.device, dtype: torch.dtype
) -> float:
    """What the step consumes: --step_rate, the measured Trainer step (--measure_step), or the scaled target."""
    if args.step_rate:
        return args.step_rate
    if args.measure_step:
        from bench_train import run_trainer

        train_args = argparse.Namespace(grad_ckpt=False, workers=max(args.workers), attention_backend="sdpa")
        with scratch_dir() as work:
            cache = write_synthetic_shards(cfg, work / "cache", max(8 * args.batch, 64), latent, args.text_len)
            r = run_trainer(cfg, cache, train_args, device, dtype, work, batch=args.batch, compile=args.compile,
                            steps=args.step_steps, warmup=3)  # fmt: skip
        return r.samples_per_s
    target = train_flops_per_sample(cfg, TARGET_LATENT**2, args.text_len) * TARGET_SAMPLES_PER_S
    return target / train_flops_per_sample(cfg, latent**2, args.text_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deep", choices=PRESET_CHOICES, help="whose sample shapes to stream")
    ap.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sides: 32 = 256px, 64 = 512px")
    ap.add_argument("--text_len", type=int, default=128, help="T5 tokens per caption")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0 1 2; cuda 0 2 4 8)")
    ap.add_argument("--samples", type=int, default=512, help="samples per synthetic cache")
    ap.add_argument(
        "--batches", type=int, default=None, help="timed batches per round (default: one pass of the cache)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; the fastest counts")
    ap.add_argument("--batch_dtype", nargs="+", default=["float32"], help="dtype of delivered batches (float16 too)")
    ap.add_argument("--step_rate", type=float, default=None, help="samples/s the step consumes (the peer column)")
    ap.add_argument("--measure_step", action="store_true", help="measure the Trainer step here (bench_train.py)")
    ap.add_argument("--step_steps", type=int, default=10, help="timed steps of --measure_step")
    ap.add_argument("--compile", action="store_true", help="--measure_step with each block compiled")
    ap.add_argument(
        "--verify_shards", nargs="+", default=["on"], choices=["on", "off"],
        help="sha256 of each shard as a worker opens it (on), or not (off); a fresh loader hashes in its first pass, "
        "so time it with --rounds 1",
    )  # fmt: skip
    ap.add_argument("--first_pass", action="store_true", help="time whole first passes (fresh loaders) instead")
    ap.add_argument(
        "--pass_start", action="store_true",
        help="the wait for a pass's first batch (passes 2..--rounds+1) against the median wait for any other batch, "
        "the consumer spending batch / (step's samples/s) per batch",
    )  # fmt: skip
    ap.add_argument("--workdir", default=None, help="keep the synthetic caches here (default: a temp dir)")
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = setup_device(args)
    if args.workers is None:
        args.workers = [0, 2, 4, 8] if device.type == "cuda" else [0, 1, 2]
    # The synthetic shards are written unpadded, with the VAE shift (the masked regime): the reader's work is the same
    # at a fixed text_len, so the stream is checked against the preset's shapes in that regime.
    cfg = replace(make_config(args.preset), text_regime="masked", latent_shift=True)
    pin = device.type == "cuda"
    # A round of one whole pass holds one shuffle-buffer fill per sample read, as a long run over a large cache does.
    args.batches = args.batches or -(-args.samples // args.batch)
    rows = []
    with scratch_dir(args.workdir) as work:
        for latent in args.latents:
            cache = write_synthetic_shards(cfg, work / f"cache_{latent}", args.samples, latent, args.text_len)
            size = sum(f.stat().st_size for f in (cache / "shards").glob("*.tar")) / args.samples / 2**10
            consumes = step_rate(args, cfg, latent, device, dtype)
            for batch_dtype in args.batch_dtype:
                for w in args.workers:
                    if args.pass_start:
                        first, other = pass_start_waits(
                            str(cache), cfg, args.batch, w, parse_dtype(batch_dtype), pin, args.batch / consumes,
                            args.rounds + 1,
                        )  # fmt: skip
                        name = f"{latent * 8}px, {w} workers, {batch_dtype}: wait for a pass's first batch"
                        rows.append(Row(name, 1e3 * first, 1e3 * other, "ms (peer: any other batch)"))
                        continue
                    for verify in args.verify_shards:
                        if args.first_pass:
                            rate = max(
                                first_pass_rate(str(cache), cfg, args.batch, w, parse_dtype(batch_dtype), pin,
                                                verify == "on")
                                for _ in range(args.rounds)
                            )  # fmt: skip
                        else:
                            rate = reader_rate(
                                str(cache), cfg, args.batch, w, args.batches, max(2 * w, 2), parse_dtype(batch_dtype),
                                pin, args.rounds, verify == "on",
                            )  # fmt: skip
                        name = f"{latent * 8}px ({size:.0f} KiB/sample), {w} workers, {batch_dtype} batches"
                        rows.append(Row(f"{name}, verify {verify}", rate, consumes, "samples/s"))
    source = "--step_rate" if args.step_rate else ("measured Trainer step" if args.measure_step else "issue target")
    title = (
        f"Streaming reader vs the step's consumption: preset={args.preset} batch={args.batch} text={args.text_len} "
        f"tokens, pin_memory={pin}, best of {args.rounds} x {args.batches} batches (target: ratio >= 5x)"
    )
    ceiling = matmul_ceiling_tflops(device, dtype)
    print_table(title, rows, ceiling, describe_device(device), f"samples/s the train step consumes ({source})")


if __name__ == "__main__":
    main()
