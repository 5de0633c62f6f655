"""Images/s of the full cache build (build_cache.py's run_build: VAE + T5 + CLIP + Lune + Sol, shards written) against
each of its stages alone, timed through the same ModelZoo calls the build makes. Prints one table.

    python bench/bench_cache.py                                          # CPU: tiny zoo, 64 and 128 px demo images
    python bench/bench_cache.py --zoo hub --resolutions 256 512 --images 256 --batch_size 32   # GPU, real models
    python bench/bench_cache.py --zoo random-full --resolutions 256 --images 64 --batch_size 32  # GPU, real sizes

The build's rate is its steady state: (2N - N) images / (time of a build of 2N images - time of a build of N), so
model loading, accelerate start-up and the manifest drop out. The peer column of the first row is the stages run back
to back (1 / the sum of their seconds per image): a build faster than that overlaps stages, a slower one waits on
something no stage accounts for. A stage row's peer is the full build, so its ratio says how many times faster the
stage runs alone; its share of the build's time is in its name. `--zoo hub` needs the real models in the local
Hugging Face cache on a machine without internet; `--zoo random-full` times the same architectures with random weights
(written once to --random_zoo_dir, 4.1 GB, and reused; the features are meaningless, the seconds are the real ones).
`--preset` defaults to the zoo's: `deep` for hub and random-full, `tiny` otherwise. Demo images are PNGs already at the resolution: a real dataset's
JPEG decode and resize cost more (the build does them in --num_loaders threads, overlapped with the models).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    Row,
    add_device_args,
    add_zoo_args,
    describe_device,
    matmul_ceiling_tflops,
    print_table,
    resolve_zoo,
    scratch_dir,
    setup_device,
)
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tinyflux.cache.build import BuildCacheArgs, run_build
from tinyflux.cache.encode import (
    encode_batch,
    lune_features,
    prepare_image,
    sol_features,
    teacher_context,
    text_features,
)
from tinyflux.cache.format import T_BUCKETS, encode_sample, shard_path, write_shard
from tinyflux.frozen.zoo import ModelZoo
from tinyflux.model.config import TinyFluxConfig
from tinyflux.tools.demo_images import write_demo_images

LUNE = "Lune, 10 buckets in one call"
SOL = "Sol, 10 buckets in one call"
CONTEXT = "teacher context (CLIP, once per batch)"


def build_seconds(args: argparse.Namespace, images: Path, out: Path, resolution: int, zoo: str | None) -> float:
    """Wall seconds of run_build over a folder (a fresh output directory)."""
    build = BuildCacheArgs(
        output=str(out),
        images=str(images),
        zoo=zoo,
        model_preset=args.preset,
        resolution=resolution,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        dtype="auto" if args.dtype == "auto" else args.dtype,
    )
    start = time.perf_counter()
    run_build(build)
    return time.perf_counter() - start


def per_batch(fn: Callable[[list[Any], list[str]], Any], images: list[Any], captions: list[str], bs: int) -> None:
    for i in range(0, len(images), bs):
        fn(images[i : i + bs], captions[i : i + bs])


def stage_seconds(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    """Fastest of `rounds` timed runs of fn (after one untimed run: lazy model loading)."""
    fn()
    best = float("inf")
    for _ in range(max(rounds, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def stage_flops(fn: Callable[[], Any], device: torch.device) -> float:
    """FLOPs of one run of fn; on a CPU through the math attention kernel, which the counter can see (it counts the
    fused GPU kernels itself; an empty backend list would disable them all)."""
    kernels = sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, kernels:
        fn()
    return float(counter.get_total_flops())


def t5_alone(zoo: ModelZoo, captions: list[str]) -> None:
    """The T5 encoder's forward as encode_prompts_batched runs it, without CLIP."""
    from tinyflux.frozen.sources import T5_MAX_LENGTH

    tokenizer, t5 = zoo.load_t5()
    tokens = tokenizer(captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt")
    device = next(t5.parameters()).device
    with torch.no_grad():
        t5(
            input_ids=tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
        )


def write_alone(out: Path, images: list[Any], captions: list[str], zoo: ModelZoo, bs: int) -> Callable[[], None]:
    """encode_sample + write_shard of every image's features (one batch's outputs, reused), as the build writes them."""
    feats = encode_batch(zoo, images[:bs], captions[:bs])
    n = int(feats["t5_lengths"].max())

    def write() -> None:
        samples = []
        for i in range(len(images)):
            j = i % bs
            tensors = {k: v[j].half() for k, v in feats.items() if k != "t5_lengths"}
            tensors["t5_embeds"] = tensors["t5_embeds"][:n]
            samples.append(encode_sample(f"img{i:06d}", captions[i], tensors, {"input_index": i}))
        write_shard(shard_path(out, 0), samples, {"input_keys": [], "feature_hash": ""})

    return write


def stage_calls(
    zoo: ModelZoo, paths: list[Path], captions: list[str], res: int, bs: int, write_dir: Path
) -> dict[str, Callable[[], Any]]:
    """Each stage of the build over all inputs, as the build calls it, in batches of bs."""

    def load() -> list[Image.Image]:
        return [prepare_image(Image.open(p), res) for p in paths]

    images = load()
    # The build computes each batch's context once (CONTEXT) and hands it to both teachers; so do these stage rows.
    contexts = {captions[i]: teacher_context(zoo, captions[i : i + bs]) for i in range(0, len(captions), bs)}
    return {
        "image load + resize (1 thread)": load,
        "VAE encode": lambda: zoo.encode_images_batched(images, batch_size=bs),
        "T5 alone": lambda: per_batch(lambda _, c: t5_alone(zoo, c), images, captions, bs),
        CONTEXT: lambda: per_batch(lambda _, c: teacher_context(zoo, c), images, captions, bs),
        "text as built (T5 + CLIP pooled)": lambda: per_batch(
            lambda _, c: text_features(zoo, c, batch_size=bs), images, captions, bs
        ),
        LUNE: lambda: per_batch(
            lambda _, c: lune_features(zoo, c, T_BUCKETS, 0, bs, True, context=contexts[c[0]]), images, captions, bs
        ),
        SOL: lambda: per_batch(
            lambda _, c: sol_features(zoo, c, T_BUCKETS, 0, bs, True, context=contexts[c[0]]), images, captions, bs
        ),
        "shard encode + write": write_alone(write_dir, images, captions, zoo, bs),
    }


def stage_flops_per_image(
    zoo: ModelZoo, paths: list[Path], captions: list[str], res: int, device: torch.device
) -> dict[str, float]:
    """FLOPs per image of each model stage, counted on two inputs."""
    images, text = [prepare_image(Image.open(p), res) for p in paths[:2]], captions[:2]
    context = teacher_context(zoo, text)
    calls = {
        "VAE encode": lambda: zoo.encode_images_batched(images),
        "T5 alone": lambda: t5_alone(zoo, text),
        CONTEXT: lambda: teacher_context(zoo, text),
        LUNE: lambda: lune_features(zoo, text, T_BUCKETS, 0, batch_timesteps=True, context=context),
        SOL: lambda: sol_features(zoo, text, T_BUCKETS, 0, context=context),
    }
    return {name: stage_flops(fn, device) / len(text) for name, fn in calls.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="image sides in pixels")
    ap.add_argument("--images", type=int, default=48, help="N: builds of N and 2N images give the steady rate")
    ap.add_argument("--batch_size", type=int, default=16, help="the build's --batch_size")
    ap.add_argument("--shard_size", type=int, default=1000, help="the build's --shard_size")
    ap.add_argument("--preset", default=None, help="model preset whose t5_layers the cache holds (default: the zoo's)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each stage; the fastest counts")
    ap.add_argument("--build_rounds", type=int, default=1, help="builds of each size; the fastest counts")
    add_zoo_args(ap)
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = setup_device(args)
    rows: list[Row] = []
    ceiling = matmul_ceiling_tflops(device, dtype)
    with scratch_dir() as work:
        choice = resolve_zoo(args.zoo, args.random_zoo_dir, work)
        args.preset = args.preset or choice.preset
        layers = TinyFluxConfig.preset(args.preset).t5_layers
        zoo_path = choice.path
        zoo = ModelZoo(device=str(device), dtype=dtype, t5_layers=layers, **({"zoo": zoo_path} if zoo_path else {}))
        for res in args.resolutions:
            n, bs = args.images, args.batch_size
            folders = {k: work / f"images_{res}_{k}" for k in (n, 2 * n)}
            for k, folder in folders.items():
                write_demo_images(folder, n=k, size=res, seed=0)
            small, large = (
                min(
                    build_seconds(args, folders[k], work / f"cache_{res}_{k}_{r}", res, zoo_path)
                    for r in range(args.build_rounds)
                )
                for k in (n, 2 * n)
            )
            # The difference of two builds drops the fixed costs; when load from other processes swamps it, fall
            # back to the 2N build's own rate, start-up included (a lower bound).
            steady = large > small
            build_rate = n / (large - small) if steady else 2 * n / large

            paths = sorted(folders[n].glob("*.png"))
            captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
            stages = stage_calls(zoo, paths, captions, res, bs, work / f"write_{res}")
            seconds = {name: stage_seconds(fn, device, args.rounds) for name, fn in stages.items()}
            flops = stage_flops_per_image(zoo, paths, captions, res, device)
            # What the build runs one after another: the loader threads overlap image loading, T5 + CLIP run as text.
            serial = [
                "VAE encode",
                "text as built (T5 + CLIP pooled)",
                CONTEXT,
                LUNE,
                SOL,
                "shard encode + write",
            ]
            serial_rate = n / sum(seconds[k] for k in serial)
            # VAE + T5 + CLIP (the pooled pass) + CLIP (the teachers' context) + Lune + Sol
            build_flops = sum(flops.values())
            rows.append(
                Row(
                    f"{res}px full build ({'steady state' if steady else 'incl. start-up'}; "
                    f"{small:.1f} s / {large:.1f} s)",
                    build_rate,
                    serial_rate,
                    "images/s",
                    build_flops,
                    build_flops,
                )
            )
            for name, sec in seconds.items():
                share = 100 * (sec / n) / (1 / build_rate)
                rows.append(
                    Row(f"{res}px {name} ({share:.0f}% of build)", n / sec, build_rate, "images/s", flops.get(name))
                )
    title = (
        f"Cache build: run_build vs its stages alone, zoo={choice.label} preset={args.preset} "
        f"N={args.images} batch_size={args.batch_size} dtype={str(dtype).removeprefix('torch.')}"
    )
    ceiling = max(ceiling, matmul_ceiling_tflops(device, dtype))  # again at the end: a busy moment only lowers it
    print_table(title, rows, ceiling, describe_device(device), "first row: stages back to back; others: full build")


if __name__ == "__main__":
    main()
