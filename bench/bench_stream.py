"""Samples/s the streaming reader (tinyflux.cache.loaders.make_stream_loader) delivers with N DataLoader workers, from
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

    python bench/bench_stream.py --latents 32 --sources disk http  # the same cache from disk and from loopback HTTP
    python bench/bench_stream.py --scale 1000 10000                # build and reader cost as the cache grows

`--sources http` serves the cache from a `python -m http.server` process on 127.0.0.1 (another process, as a store
is another machine) and streams it by URL (tinyflux.cache.source): each worker fetches whole shards into
memory, checks size and sha256, and parses them from memory. `--scale N ...` prints, per cache size and source, the
cache's bytes, the time to write it (shard writer + manifest, no encoders), to open it (manifest + per-shard checks),
to the first batch (a fresh loader, 0 workers: one shuffle-buffer fill), and the reader's memory growth (RSS after
the first batch minus before opening).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

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
    synthetic_cache,
    train_flops_per_sample,
    write_synthetic_shards,
)

from tinyflux.cache.format import (
    SHARD_DIR,
    assemble_manifest,
    encode_sample,
    feature_hash,
    feature_settings,
    fields_of,
    shard_path,
    write_manifest,
    write_shard,
)
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.model.config import TinyFluxConfig
from tinyflux.util.dtypes import parse_dtype

T = TypeVar("T")
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


@contextmanager
def served(cache_dir: Path) -> Iterator[str]:
    """`cache_dir` served by `python -m http.server` on a free loopback port, in its own process; yields the URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(cache_dir)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it accepts connections (a second at most)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=10)


def write_scaled_cache(cfg: TinyFluxConfig, out: Path, n: int, latent: int, text_len: int, shard_size: int) -> float:
    """A cache of n samples in shards of shard_size, written one shard at a time by the real shard writer (the
    tensors of one shard are reused under new keys, so memory stays one shard's); returns the seconds it took."""
    one = synthetic_cache(cfg, shard_size, latent, text_len)
    tensors = [{k: v for k, v in one.sample(i).items() if isinstance(v, torch.Tensor) and k != "t_buckets"}
               for i in range(shard_size)]  # fmt: skip
    tensors = [{k: v.half() for k, v in t.items()} for t in tensors]  # build_cache.py's storage dtype
    settings = feature_settings(resolution=latent * 8, t5_layers=cfg.t5_layers, seed=0, sources={},
                                compute_dtype="float32", storage_dtype="float16", lune=True, sol=True,
                                text_regime=cfg.text_regime, latent_shift=cfg.latent_shift)  # fmt: skip
    start = time.perf_counter()
    num_shards = -(-n // shard_size)
    for j in range(num_shards):
        rows = range(j * shard_size, min(n, (j + 1) * shard_size))
        samples = [encode_sample(f"s{i:07d}", f"synthetic caption {i}", tensors[i % shard_size],
                                 {"input_index": i, "t5_length": text_len}) for i in rows]  # fmt: skip
        sidecar = {"input_keys": [f"s{i:07d}" for i in rows], "skipped": [], "feature_hash": feature_hash(settings),
                   "fields": fields_of(tensors[0]), "t5_length_sum": text_len * len(rows), "t5_length_max": text_len}  # fmt: skip
        write_shard(shard_path(out, j), samples, sidecar)
    write_manifest(out, assemble_manifest(out, num_shards, "scale", settings))
    return time.perf_counter() - start


def rss_mib() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def open_and_first_batch(source: str, cfg: TinyFluxConfig, batch: int) -> tuple[float, float, float]:
    """(seconds to open, seconds to the first batch, MiB of RSS growth) of a fresh 0-worker loader. Run it in a fresh
    process (measured_apart): in this one, memory freed by an earlier measurement would hide the next one's growth."""
    before = rss_mib()
    start = time.perf_counter()
    loader = make_stream_loader(source, batch_size=batch, num_workers=0, seed=0, rank=0, world_size=1,
                                model_config=cfg, dtype=torch.float16)  # fmt: skip
    opened = time.perf_counter()
    stream = iter(loader)
    next(stream)
    first = time.perf_counter()
    grown = rss_mib() - before
    del stream
    return opened - start, first - opened, grown


def scale_table(args: argparse.Namespace, cfg: TinyFluxConfig) -> None:
    latent = args.latents[0]
    lines = [
        f"Cache build and reader cost by size: preset={args.preset}, {latent * 8} px, {args.text_len} tokens, "
        f"shards of {args.scale_shard_size}, batch {args.batch}, shuffle buffer 1000, 0 workers",
        "| samples | shards | cache size | write + manifest | source | open | first batch | reader RSS growth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.scale:
        with scratch_dir(args.workdir and str(Path(args.workdir) / f"scale_{n}")) as work:
            cache = work / "cache"
            seconds = write_scaled_cache(cfg, cache, n, latent, args.text_len, args.scale_shard_size)
            size = sum(f.stat().st_size for f in (cache / SHARD_DIR).glob("*.tar"))
            shards = len(list((cache / SHARD_DIR).glob("*.tar")))
            for name in args.sources:
                with served(cache) if name == "http" else _local(cache) as source:
                    opened, first, grown = measured_apart(open_and_first_batch, source, cfg, args.batch)
                lines.append(
                    f"| {n} | {shards} | {size / 2**30:.2f} GiB | {seconds:.1f} s | {name} | {opened * 1e3:.0f} ms | "
                    f"{first:.2f} s | {grown:.0f} MiB |"
                )
                print(lines[-1], flush=True)
    print("\n".join(lines), flush=True)


def measured_apart(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a freshly spawned process (a clean heap and no inherited threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


@contextmanager
def _local(cache: Path) -> Iterator[str]:
    yield str(cache)


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
    ap.add_argument(
        "--sources", nargs="+", default=["disk"], choices=["disk", "http"],
        help="read the cache from its directory, or by URL from a loopback HTTP server process",
    )  # fmt: skip
    ap.add_argument("--scale", type=int, nargs="+", default=None, help="cache sizes for the build / reader cost table")
    ap.add_argument("--scale_shard_size", type=int, default=1000, help="--scale: samples per shard (the build's)")
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = setup_device(args)
    if args.workers is None:
        args.workers = [0, 2, 4, 8] if device.type == "cuda" else [0, 1, 2]
    cfg = make_config(args.preset)
    if args.scale:
        scale_table(args, cfg)
        return
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
                        for source_name in args.sources:
                            with served(cache) if source_name == "http" else _local(cache) as source:
                                if args.first_pass:
                                    rate = max(
                                        first_pass_rate(source, cfg, args.batch, w, parse_dtype(batch_dtype), pin,
                                                        verify == "on")
                                        for _ in range(args.rounds)
                                    )  # fmt: skip
                                else:
                                    rate = reader_rate(
                                        source, cfg, args.batch, w, args.batches, max(2 * w, 2),
                                        parse_dtype(batch_dtype), pin, args.rounds, verify == "on",
                                    )  # fmt: skip
                            name = f"{latent * 8}px ({size:.0f} KiB/sample), {w} workers, {batch_dtype} batches"
                            rows.append(Row(f"{name}, verify {verify}, {source_name}", rate, consumes, "samples/s"))
    source = "--step_rate" if args.step_rate else ("measured Trainer step" if args.measure_step else "issue target")
    title = (
        f"Streaming reader vs the step's consumption: preset={args.preset} batch={args.batch} text={args.text_len} "
        f"tokens, pin_memory={pin}, best of {args.rounds} x {args.batches} batches (target: ratio >= 5x)"
    )
    ceiling = matmul_ceiling_tflops(device, dtype)
    print_table(title, rows, ceiling, describe_device(device), f"samples/s the train step consumes ({source})")


if __name__ == "__main__":
    main()
