"""Samples/s of training on aspect buckets against square crops of the same images, with each loader: in memory
(--in_memory: BucketLoader against the square DataLoader) and streamed (StreamingLoader's per-bucket buffers against
its square batches). One folder of pictures of five shapes (1:1, 3:2, 2:3, 2:1, 1:2) is cached twice by
build_cache.py, without --buckets (square crops) and with --buckets auto, then trained with the same flags. The
issue's goal: within 10%.

    python bench/bench_buckets.py                       # tiny zoo and preset, 64 px, CPU
    python bench/bench_buckets.py --bucket_batch tokens --images 120 --steps 40

Training samples/s is the Trainer's own logged figure over the second half of a run of 2 x `--steps` optimizer steps
(set-up, model creation and the first steps left out), best of `--rounds` runs of each, alternating.
The loader rows time one epoch of each loader alone (collation included), batches delivered to the training process.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch
from common import Row, describe_device, matmul_ceiling_tflops, print_table, scratch_dir
from PIL import Image

from tinyflux.cache.build import BuildCacheArgs, run_build
from tinyflux.tools.tiny_zoo import make_tiny_zoo
from tinyflux.trainer.args import parse_args
from tinyflux.trainer.main import build_dataloader, run_training

SHAPES = [(1, 1), (3, 2), (2, 3), (2, 1), (1, 2)]  # width : height


def write_images(root: Path, count: int, resolution: int) -> None:
    """`count` smooth pictures, the shapes of SHAPES in turn, shorter side 1.5 x resolution."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rw, rh = SHAPES[i % len(SHAPES)]
        short = resolution * 3 // 2
        w, h = (short * rw // min(rw, rh), short * rh // min(rw, rh))
        x = torch.linspace(0, 1, w)[None, :, None].expand(h, w, 1)
        y = torch.linspace(0, 1, h)[:, None, None].expand(h, w, 1)
        rgb = torch.cat([x, y, (x * y * (1 + i % 7) / 7)], dim=-1)
        Image.fromarray((rgb * 255).to(torch.uint8).numpy()).save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(f"a gradient of shape {rw}:{rh}, number {i}")


LOADERS = {"in-memory": ["--in_memory"], "streamed": []}


def train_argv(cache: Path, out: Path, args: argparse.Namespace, steps: int, loader: str) -> list[str]:
    return [
        "--cache", str(cache), *LOADERS[loader], "--model", args.preset, "--dtype", "float32", "--batch_size",
        str(args.batch_size), "--bucket_batch", args.bucket_batch, "--total_steps", str(steps), "--num_workers", "0",
        "--save_every_steps", "none", "--log_with", "none", "--log_every", "1000", "--checkpoint_dir",
        str(out / "checkpoints"), "--tensorboard_dir", str(out / "logs"),
    ]  # fmt: skip


def train_rate(cache: Path, out: Path, args: argparse.Namespace, loader: str) -> float:
    """The Trainer's own samples/s (what it logs) over the second half of a run of 2 x --steps optimizer steps: set-up,
    model creation and the first steps are not in it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.rmtree(out, ignore_errors=True)  # a kept work directory's earlier run
    argv = train_argv(cache, out, args, 2 * args.steps, loader)
    argv[argv.index("--log_with") + 1], argv[argv.index("--log_every") + 1] = "tensorboard", str(args.steps)
    run_training(parse_args(argv))
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents*")).parent))
    events.Reload()
    return events.Scalars("samples_per_sec")[-1].value


def loader_rate(cache: Path, work: Path, args: argparse.Namespace, loader: str) -> float:
    """Samples/s of the second and third epochs of the loader alone (the first carries its start-up)."""
    run = parse_args(train_argv(cache, work / "loader", args, 1, loader))
    batches = build_dataloader(
        run.script.cache,
        run.model_config,
        run.trainer,
        in_memory=run.script.in_memory,
        bucket_batch=run.script.bucket_batch,
    )
    for _ in batches:
        pass
    start, count = time.perf_counter(), 0
    for _ in range(2):
        for batch in batches:
            count += batch["latents"].shape[0]
    if callable(getattr(batches, "close", None)):
        batches.close()
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60, help="pictures (the five shapes in turn)")
    ap.add_argument("--resolution", type=int, default=64, help="--resolution of both caches (a multiple of 16)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of the short run (the long one: twice)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating; the best counts")
    ap.add_argument("--bucket_batch", default="samples", choices=("samples", "tokens"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    with scratch_dir(args.keep) as work:
        zoo = make_tiny_zoo(work / "zoo", seed=0)
        write_images(work / "images", args.images, args.resolution)
        caches = {}
        for name, buckets in (("square", None), ("buckets", "auto")):
            caches[name] = work / name
            run_build(
                BuildCacheArgs(
                    output=str(caches[name]), images=str(work / "images"), zoo=str(zoo), model_preset=args.preset,
                    resolution=args.resolution, buckets=buckets,
                )
            )  # fmt: skip
        # rounds alternate between the two, and each keeps its best: a machine shared with other work slows a round
        # now and then, never speeds one up
        train = {(name, loader): 0.0 for name in caches for loader in LOADERS}
        for r in range(args.rounds):
            for loader in LOADERS:
                for name, cache in caches.items():
                    out = work / f"{name}-{loader}{r}"
                    train[name, loader] = max(train[name, loader], train_rate(cache, out, args, loader))
        alone = {
            (name, loader): loader_rate(cache, work / name, args, loader)
            for name, cache in caches.items()
            for loader in LOADERS
        }
    device = torch.device("cpu")
    rows = []
    for loader in LOADERS:
        rows.append(
            Row(f"training (Trainer, {loader})", train["buckets", loader], train["square", loader], "samples/s")
        )
    for loader in LOADERS:
        rows.append(
            Row(f"{loader} loader alone, 2 epochs", alone["buckets", loader], alone["square", loader], "samples/s")
        )
    print_table(
        f"aspect buckets (--bucket_batch {args.bucket_batch}) vs square crops, {args.images} images at "
        f"{args.resolution} px, preset {args.preset}, batch {args.batch_size}",
        rows,
        matmul_ceiling_tflops(device, torch.float32),
        describe_device(device),
        "the same loader on square crops of the same images",
    )


if __name__ == "__main__":
    main()
