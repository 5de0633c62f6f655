"""`make demo`: the whole pipeline offline on a CPU, in a few minutes.

tiny zoo -> a built-in dataset of drawn shapes with captions -> build_cache -> train the `tiny` preset -> checkpoint,
sample grid and loss curve. Every stage runs through the same code as the real scripts.

    python -m tinyflux.demo --output runs/demo [--steps 2000] [--images 256]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch

from tinyflux.cache.build import BuildCacheArgs, run_build
from tinyflux.frozen.zoo import ModelZoo
from tinyflux.model.loader import EMA_WEIGHTS_NAME, load_model
from tinyflux.sampling.sampler import Sampler
from tinyflux.tools.demo_images import write_demo_images
from tinyflux.tools.tiny_zoo import make_tiny_zoo
from tinyflux.trainer.args import parse_args
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.main import run_training
from tinyflux.util.plots import plot_curves

RESOLUTION = 64  # pixels: 8x8 latents = 64 image tokens, so a step takes milliseconds on a CPU
PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a white triangle on a black background",
    "a blue circle on a yellow background",
]


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar from the TensorBoard event files under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: list[tuple[int, float]] = []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(set(points))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="runs/demo", help="everything is written under this directory")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps of training (~13/s on 2 CPU cores)")
    ap.add_argument("--images", type=int, default=256, help="size of the built-in dataset")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    start = time.perf_counter()

    zoo_dir = out / "zoo"
    if not (zoo_dir / "vae").exists():
        make_tiny_zoo(zoo_dir, seed=args.seed)
    print(f"[1/5] tiny zoo: {zoo_dir}")

    image_dir = out / "images"
    if not image_dir.exists():
        write_demo_images(image_dir, n=args.images, size=RESOLUTION, seed=args.seed)
    print(f"[2/5] {args.images} demo images with captions: {image_dir}")

    cache_dir = out / "cache"
    run_build(
        BuildCacheArgs(
            output=str(cache_dir), images=str(image_dir), zoo=str(zoo_dir), model_preset="tiny",
            resolution=RESOLUTION, batch_size=64, shard_size=128, seed=args.seed,
        )
    )  # fmt: skip
    print(f"[3/5] feature cache (latents, T5, CLIP, Lune, Sol): {cache_dir}")

    ckpt_dir, log_dir = out / "checkpoints", out / "logs"
    for stale in (ckpt_dir, log_dir, out / "samples"):  # a re-run trains afresh; the zoo and the cache are reused
        shutil.rmtree(stale, ignore_errors=True)
    warmup = str(min(50, args.steps // 4))
    trainer = run_training(
        parse_args(
            [
                "--cache", str(cache_dir), "--model", "tiny", "--zoo", str(zoo_dir),
                "--total_steps", str(args.steps), "--batch_size", "32", "--gradient_accumulation", "1",
                "--learning_rate", "1e-3", "--warmup_steps", warmup, "--lr_scheduler", "cosine", "--min_lr", "1e-4",
                "--lune_warmup_steps", warmup, "--sol_warmup_steps", warmup, "--ema_decay", "0.99", "--ema_warmup",
                "--dtype", "float32", "--num_workers", "0", "--log_every", "10", "--seed", str(args.seed),
                "--save_every_steps", str(args.steps), "--sample_every", "none",
                "--checkpoint_dir", str(ckpt_dir), "--tensorboard_dir", str(log_dir), "--run_name", "demo",
            ]
        )
    )  # fmt: skip
    print(f"[4/5] trained {trainer.current_step} steps; checkpoint: {trainer.last_checkpoint}")

    model = load_model(str(trainer.last_checkpoint), device="cpu", dtype=torch.float32)
    ema = EMA.load(str(Path(trainer.last_checkpoint) / EMA_WEIGHTS_NAME), model)
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=str(zoo_dir), t5_layers=model.config.t5_layers)
    sampler = Sampler(zoo, model, ema=ema, device="cpu", dtype=torch.float32)
    images = sampler.generate(PROMPTS, num_steps=28, guidance_scale=5.0, height=8, width=8, seed=args.seed)
    grid = sampler.save_samples(images, PROMPTS, str(out / "samples"))

    losses = read_scalars(log_dir, "loss/main")
    curve = plot_curves(  # a log every 10 steps: lighter smoothing than TensorBoard's per-step default
        {"velocity loss": losses}, out / "loss_curve.png", "TinyFlux demo: main (velocity) loss", smoothing=0.6
    )
    k = max(len(losses) // 10, 1)
    first = sum(v for _, v in losses[:k]) / k
    last = sum(v for _, v in losses[-k:]) / k
    print(f"[5/5] sample grid: {grid}")
    print(f"      loss curve: {curve}")
    print(f"velocity loss: first {k} logs {first:.4f} -> last {k} logs {last:.4f} ({last / first:.0%} of the start)")
    print("(the tiny zoo's VAE has random weights, so the decoded samples show texture, not shapes)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is under {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
