"""The cache build behind build_cache.py: inputs -> batched encoders and teachers -> shards, manifest and report.

Deterministic sharding: inputs are listed in a fixed order (sorted keys for folders, row order for datasets, tar order
for webdataset inputs); shard j covers inputs [j * shard_size, (j + 1) * shard_size) and process r of R builds the
shards with j % R == r (with --dataset --streaming, process r's own chunk c is shard c * R + r). A shard's bytes
depend only on its inputs and the feature settings, so a re-run (with any number of processes; a streamed build with
the same number) skips complete shards and rebuilds an interrupted one identically. Rank 0 writes the manifest and
the report once every process is done. Formats: docs/CACHE_FORMAT.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from tinyflux.cache.buckets import Bucket, BucketError, parse_buckets
from tinyflux.cache.encode import DUPLICATE_KEY, SkippedInput, encode_batch
from tinyflux.cache.format import (
    MANIFEST_NAME,
    REPORT_NAME,
    REPORT_TEXT_NAME,
    SHARD_DIR,
    CacheFormatError,
    Manifest,
    assemble_manifest,
    feature_hash,
    feature_settings,
    read_sidecar,
    shard_is_complete,
    shard_path,
    write_cache_shard,
    write_json_atomic,
    write_manifest,
    write_report,
)
from tinyflux.cache.inputs import (
    BuildError,
    InputItem,
    StreamedRows,
    list_inputs,
    load_ahead,
    prepare_input,
    shard_chunks,
    wds_urls,
)
from tinyflux.cache.source import is_remote
from tinyflux.errors import os_error_message
from tinyflux.frozen.sources import VAE_DOWNSAMPLE
from tinyflux.model.config import PRESETS, TEXT_REGIMES, TinyFluxConfig
from tinyflux.util.dtypes import AUTO, DTYPES, dtype_name, parse_dtype, pick_device, pick_dtype

logger = logging.getLogger(__name__)

BUILD_LOCK = "build.json"  # the feature settings of the shards in an output directory, written before the first shard
STREAM_LOCK = "stream.json"  # --streaming: the number of processes, on which the shard layout depends
# The closing barrier waits for the slowest process; a resumed build can leave one rank hours of work ahead of another.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass
class BuildCacheArgs:
    """Arguments of build_cache.py (one field per flag)."""

    output: str = field(metadata={"help": "cache directory to write (shards/, manifest.json, report.json)"})
    images: Optional[str] = field(default=None, metadata={"help": "folder of images with same-stem .txt captions"})
    follow_symlinks: bool = field(
        default=False,
        metadata={"help": "--images: also read symlinks to files outside the folder (default: skip them)"},
    )
    dataset: Optional[str] = field(
        default=None, metadata={"help": "a `datasets` dataset: Hub name, or a local save_to_disk / data directory"}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "--dataset configuration name"})
    split: str = field(default="train", metadata={"help": "--dataset split"})
    streaming: bool = field(
        default=False,
        metadata={"help": "--dataset: stream it (nothing downloaded whole), each process reading its own part"},
    )
    wds: Optional[list[str]] = field(
        default=None, metadata={"help": "webdataset tars of images + captions (paths or brace patterns)"}
    )
    image_column: Optional[str] = field(
        default=None, metadata={"help": "image column (--dataset, default 'image') or extensions (--wds, 'jpg;png')"}
    )
    caption_column: Optional[str] = field(
        default=None, metadata={"help": "caption column (--dataset, default 'text') or extension (--wds, 'txt')"}
    )
    resolution: int = field(default=512, metadata={"help": "square side in pixels (multiple of 8)"})
    buckets: Optional[str] = field(
        default=None,
        metadata={
            "help": "aspect buckets: 'auto' (about resolution^2 pixels, sides multiples of 16, 1:2 to 2:1) or "
            "'h,w;h,w;...' in pixels; each image goes to the bucket of nearest aspect (default: square crops)"
        },
    )
    min_size: Optional[int] = field(
        default=None, metadata={"help": "skip images whose shorter side is below this (default resolution / 2)"}
    )
    batch_size: int = field(default=32, metadata={"help": "inputs per model batch"})
    shard_size: int = field(default=1000, metadata={"help": "inputs per shard"})
    model_preset: str = field(default="default", metadata={"help": f"preset whose t5_layers to cache: {list(PRESETS)}"})
    t5_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "T5 hidden-state indices (wins over preset)"}
    )
    latent_shift: Optional[bool] = field(
        default=None,
        metadata={
            "help": "subtract the VAE's shift_factor (false: z * scale, as released v4.2); default: the preset's"
        },
    )
    text_regime: Optional[str] = field(
        default=None,
        metadata={"help": "masked (real T5 tokens) or padded (all 128, as released v4.2 reads); default: the preset's"},
    )
    zoo: Optional[str] = field(default=None, metadata={"help": "tiny zoo directory (overrides the model sources)"})
    vae: Optional[str] = field(default=None, metadata={"help": "VAE repo id or path (default: the zoo's, FLUX.1-dev)"})
    t5: Optional[str] = field(default=None, metadata={"help": "T5 encoder repo id or path (default flan-t5-base)"})
    clip: Optional[str] = field(default=None, metadata={"help": "CLIP text repo id or path (default ViT-L/14)"})
    experts: Optional[str] = field(default=None, metadata={"help": "repo id or folder of the Lune / Sol weights"})
    teacher_base: Optional[str] = field(
        default=None,
        metadata={"help": "base UNet under a teacher file holding part of one (default: SD1.5's unet; the zoo's)"},
    )
    no_lune: bool = field(default=False, metadata={"help": "do not extract Lune features"})
    no_sol: bool = field(default=False, metadata={"help": "do not extract Sol features"})
    seed: int = field(default=0, metadata={"help": "seed of the teachers' noise (one for all samples)"})
    device: str = field(default="auto", metadata={"help": "auto (the process's GPU, else CPU), cuda or cpu"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32"})
    storage_dtype: str = field(default="float16", metadata={"help": "dtype of the stored tensors: float16 or bfloat16"})
    name: Optional[str] = field(default=None, metadata={"help": "dataset name in the manifest (default: output name)"})
    num_loaders: int = field(default=4, metadata={"help": "threads that read and resize images ahead of the models"})
    stop_after_shards: Optional[int] = field(
        default=None, metadata={"help": "testing: each process stops after writing this many shards (a killed build)"}
    )

    def __post_init__(self) -> None:
        given = [f for f in ("images", "dataset", "wds") if getattr(self, f)]
        problems = []
        if len(given) != 1:
            problems.append(f"give exactly one input: --images, --dataset or --wds (got {given or 'none'})")
        if self.streaming and not self.dataset:
            problems.append("--streaming streams a --dataset; --images and --wds inputs are read as they go already")
        if self.images and not Path(self.images).is_dir():
            problems.append(f"--images {self.images} is not a directory")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            problems.append(f"--output {self.output} exists and is not a directory")
        for url in wds_urls(self.wds or ()):
            if not is_remote(url) and not Path(url).is_file():
                problems.append(f"--wds: {url} does not exist")
        if self.wds and not wds_urls(self.wds):
            problems.append(f"--wds {' '.join(self.wds)}: no .tar files there")
        if self.resolution <= 0 or self.resolution % VAE_DOWNSAMPLE:
            problems.append(
                f"--resolution {self.resolution} must be a positive multiple of {VAE_DOWNSAMPLE} (the VAE's downsampling)"
            )
        if self.buckets is not None and not problems:
            try:
                parse_buckets(self.buckets, self.resolution)
            except BucketError as e:
                problems.append(str(e))
        for name in ("batch_size", "shard_size", "num_loaders"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} {getattr(self, name)} must be >= 1")
        if self.model_preset not in PRESETS:
            problems.append(f"--model_preset {self.model_preset!r}: choose one of {list(PRESETS)}")
        elif self.regime not in TEXT_REGIMES:
            problems.append(f"--text_regime {self.text_regime!r}: choose one of {list(TEXT_REGIMES)}")
        if DTYPES.get(self.storage_dtype) not in (torch.float16, torch.bfloat16):
            problems.append(f"--storage_dtype {self.storage_dtype!r}: choose float16 or bfloat16")
        if self.dtype != AUTO and self.dtype not in DTYPES:
            problems.append(f"--dtype {self.dtype!r}: choose auto, bf16, fp16 or fp32")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"--device {self.device!r}: choose auto, cuda or cpu")
        if problems:
            raise BuildError("build_cache.py arguments:\n  - " + "\n  - ".join(problems))

    @property
    def bucket_list(self) -> list[Bucket]:
        """The --buckets buckets; empty without --buckets (square crops at --resolution)."""
        return parse_buckets(self.buckets, self.resolution) if self.buckets is not None else []

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.t5_layers) if self.t5_layers else TinyFluxConfig.preset(self.model_preset).t5_layers

    @property
    def regime(self) -> str:
        return self.text_regime or TinyFluxConfig.preset(self.model_preset).text_regime


@dataclass
class _Shard:
    """What one process needs to build one shard."""

    index: int
    items: list[InputItem]
    duplicates: set[int]  # id() of the items in this chunk whose key an earlier input already has
    stream_state: dict[str, Any] | None = None  # --streaming: datasets' position after this chunk (StreamedRows)


class CacheBuilder:
    """Builds the shards of one process. Use run_build(args) for the whole multi-process build."""

    def __init__(self, args: BuildCacheArgs, zoo: Any, settings: dict[str, Any], bar: tqdm):
        self.args, self.zoo, self.settings, self.bar = args, zoo, settings, bar
        self.feature_hash = feature_hash(settings)
        self.storage_dtype = parse_dtype(settings["storage_dtype"])
        self.pool = ThreadPoolExecutor(args.num_loaders)
        self.buckets = args.bucket_list

    def __enter__(self) -> CacheBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()

    def skip_progress(self, inputs: int) -> None:
        """Inputs of a shard complete from an earlier run: off the bar's total, so its rate is the real one."""
        if self.bar.total is not None:
            self.bar.total -= inputs
            self.bar.refresh()

    def _skip(self, item: InputItem, reason: str, detail: str) -> dict[str, str]:
        return {"key": item.key, "reason": reason, "detail": detail, "source": item.source}

    def build(self, shard: _Shard) -> dict[str, Any]:
        """Encode a shard's usable inputs in batches and write it; returns its sidecar."""
        args = self.args
        positions = {id(item): shard.index * args.shard_size + i for i, item in enumerate(shard.items)}
        load = partial(prepare_input, resolution=args.resolution, min_size=args.min_size, buckets=self.buckets)
        samples, skipped, bucket_counts = [], [], {}
        bucket_of: dict[int, int] = {}  # per sample: its bucket's position in the bucket list
        order: list[int] = []  # those positions in shard order
        for batch, results in load_ahead(self.pool, shard.items, args.batch_size, load):
            good = []
            for item, result in zip(batch, results, strict=True):
                if id(item) in shard.duplicates:
                    skipped.append(self._skip(item, DUPLICATE_KEY, "an earlier input has the same key"))
                elif isinstance(result, SkippedInput):
                    skipped.append(self._skip(item, result.reason, result.detail))
                else:
                    good.append((item, *result))
            encoded = {}
            # one model batch per image size: a batch of the square build is one group, as before buckets
            for size in dict.fromkeys(image.size for _, image, _ in good):
                group = [g for g in good if g[1].size == size]
                out = self._encode([image for _, image, _ in group], [caption for _, _, caption in group], size)
                for b, (item, _, caption) in enumerate(group):
                    n = int(out["t5_lengths"][b])
                    tensors = {k: v[b] for k, v in out.items() if k != "t5_lengths"}
                    tensors["t5_embeds"] = tensors["t5_embeds"][:n]  # (n, K, D): no padding on disk
                    tensors = {k: v.to(self.storage_dtype) for k, v in tensors.items()}
                    meta = {"input_index": positions[id(item)], "t5_length": n}
                    if self.buckets:
                        meta |= {
                            "latent_height": tensors["latents"].shape[1],
                            "latent_width": tensors["latents"].shape[2],
                        }
                        name = f"{size[1]}x{size[0]}"
                        bucket_counts[name] = bucket_counts.get(name, 0) + 1
                        bucket_of[id(item)] = self.buckets.index(Bucket(size[1], size[0]))
                    encoded[id(item)] = (item.key, caption, tensors, meta)
            samples += [encoded[id(item)] for item, _, _ in good]  # input order, whatever the buckets
            order += [bucket_of[id(item)] for item, _, _ in good if id(item) in bucket_of]
            self.bar.update(len(batch))
        extra: dict[str, Any] = {}
        if self.buckets:
            # each sample's bucket (index into the manifest's buckets), so that a reader knows every sample's shape
            # without reading the shard: the streaming loader plans every rank's batches with it
            extra = {"bucket_counts": bucket_counts, "bucket_of": order}
        if shard.stream_state is not None:
            extra["stream_state"] = shard.stream_state
        keys = [item.key for item in shard.items]
        return write_cache_shard(
            shard_path(args.output, shard.index),
            samples,
            keys,
            self.feature_hash,
            skipped=skipped,
            bucketed=bool(self.buckets),
            **extra,
        )

    def _encode(self, images: list[Any], captions: list[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """encode_batch of images of one `size` (w, h); an aspect bucket's teachers see noise of its teacher grid."""
        grid = None
        if self.buckets and (self.settings["lune"] or self.settings["sol"]):
            unet = self.zoo.load_lune() if self.settings["lune"] else self.zoo.load_sol()
            grid = Bucket(size[1], size[0]).teacher_grid(self.args.resolution, unet.config.sample_size)
        return encode_batch(
            self.zoo,
            images,
            captions,
            lune=self.settings["lune"],
            sol=self.settings["sol"],
            seed=self.settings["seed"],
            t_buckets=torch.tensor(self.settings["t_buckets"]),
            text_regime=self.settings.get("text_regime", "masked"),
            latent_shift=self.settings.get("latent_shift", True),
            teacher_grid=grid,
        )


def _make_accelerator(device: str) -> Any:
    """The build's Accelerator on --device (auto: the GPU when there is one)."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    cpu = pick_device(device).type == "cpu"
    # cpu=True is what makes processes of `accelerate launch --multi_gpu` on a machine without GPUs join a gloo group
    return Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)])


def _make_zoo(args: BuildCacheArgs, device: torch.device, dtype: torch.dtype) -> Any:
    from tinyflux.frozen.zoo import ModelZoo

    sources = {"vae_repo": args.vae, "t5_repo": args.t5, "clip_repo": args.clip, "experts_repo": args.experts}
    sources = {k: v for k, v in sources.items() if v is not None} | {"teacher_base": args.teacher_base}
    return ModelZoo(device=str(device), dtype=dtype, zoo=args.zoo, t5_layers=args.layers, **sources)


def build_settings(args: BuildCacheArgs, zoo: Any, compute_dtype: torch.dtype) -> dict[str, Any]:
    preset = TinyFluxConfig.preset(args.model_preset)
    sources = {"vae": zoo.vae_repo, "t5": zoo.t5_repo, "clip": zoo.clip_repo, "experts": zoo.experts_repo}
    if args.teacher_base:
        # Only when given: the default base follows from the experts source, and caches built before the flag keep
        # their feature hash. Another base can change the teachers (when a file holds part of a UNet), so it counts.
        sources["teacher_base"] = args.teacher_base
    return feature_settings(
        resolution=args.resolution,
        t5_layers=args.layers,
        seed=args.seed,
        sources=sources,
        compute_dtype=dtype_name(compute_dtype),
        storage_dtype=dtype_name(parse_dtype(args.storage_dtype)),
        lune=not args.no_lune,
        sol=not args.no_sol,
        text_regime=args.regime,
        latent_shift=args.latent_shift if args.latent_shift is not None else preset.latent_shift,
        buckets=[[b.height, b.width] for b in args.bucket_list],
    )


def check_build_lock(output: Path, settings: dict[str, Any]) -> bool:
    """True when `output` already holds shards of these settings; BuildError when it holds shards of others."""
    lock = output / BUILD_LOCK
    if not lock.is_file():
        return False
    old = json.loads(lock.read_text())
    if feature_hash(old) == feature_hash(settings):
        return True
    changed = [
        f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
        for k in sorted(set(old) | set(settings))
        if old.get(k) != settings.get(k)
    ]
    raise BuildError(
        f"{output} holds a cache built with other feature settings ({'; '.join(changed)}). Use a new --output, "
        f"or delete {output} to rebuild it with these settings."
    )


def _owned_inputs(total: int | None, shard_size: int, rank: int, world: int) -> int | None:
    """How many of `total` inputs fall in the shards of process `rank`."""
    if total is None:
        return None
    return sum(min(shard_size, total - j * shard_size) for j in range(rank, -(-total // shard_size), world))


def _build_shards(
    args: BuildCacheArgs, builder: CacheBuilder, items: Iterable[InputItem], rank: int, world: int
) -> int:
    """Build this process's incomplete shards. Returns the number of shards of the whole input, or with --streaming
    the number of chunks of this process's part (its chunk c is shard c * world + rank)."""
    seen: set[str] = set()
    streamed = items if isinstance(items, StreamedRows) else None
    first = _resume_stream(args, streamed, builder.feature_hash) if streamed else 0
    num_shards, written, reused = first, 0, first
    for c, chunk in shard_chunks(items, args.shard_size, first):
        num_shards = c + 1
        j = c * world + rank if streamed else c
        duplicates = set()  # every process tracks every key, so all agree on which input is the duplicate
        for item in chunk:
            if item.key in seen:
                duplicates.add(id(item))
            seen.add(item.key)
        if j % world != rank:
            continue
        if shard_is_complete(shard_path(args.output, j), [item.key for item in chunk], builder.feature_hash):
            reused += 1
            builder.skip_progress(len(chunk))
            continue
        if args.stop_after_shards is not None and written >= args.stop_after_shards:
            continue
        builder.build(_Shard(j, chunk, duplicates, streamed.state_dict() if streamed else None))
        written += 1
    logger.info("rank %d: %d shards written, %d complete from an earlier run", rank, written, reused)
    return num_shards


def _resume_stream(args: BuildCacheArgs, rows: StreamedRows, feature_hash_: str) -> int:
    """The number of leading chunks of this process's part that are complete shards with a saved stream position;
    the stream then starts after them, reading none of their rows again."""
    size, first, state = args.shard_size, 0, None
    while True:
        path = shard_path(args.output, first * rows.world + rows.rank)
        keys = [rows.key(i) for i in range(first * size, (first + 1) * size)]
        side = read_sidecar(path)
        if side is None or "stream_state" not in side or not shard_is_complete(path, keys, feature_hash_):
            break
        first, state = first + 1, side["stream_state"]
    if state is not None:
        rows.resume(state, first * size)
        logger.info("rank %d: %d complete shards; its stream resumes at row %d", rows.rank, first, first * size)
    return first


def _check_stream_layout(output: Path, args: BuildCacheArgs, world: int) -> None:
    """A streamed build's shards depend on the number of processes (each reads its own part of the dataset), so it is
    finished on as many as started it: recorded in STREAM_LOCK, refused otherwise."""
    lock = output / STREAM_LOCK
    if args.streaming and lock.is_file():
        started = json.loads(lock.read_text())["world_size"]
        if started != world:
            raise BuildError(
                f"{output} is a --streaming build started on {started} process(es): finish it on {started} "
                f"(this run has {world}), or use a new --output"
            )


def _fill_stream_gaps(output: Path, chunks: list[int], feature_hash_: str, write: bool) -> int:
    """The number of shards of a --streaming build whose process r wrote chunks[r] chunks; with `write` (rank 0, once
    every rank is done) an empty shard goes where a process's part ended before another's (shard c * world + r for c
    past rank r's chunks), so that shards 0 .. N-1 all exist."""
    world = len(chunks)
    num_shards = max(((n - 1) * world + r + 1 for r, n in enumerate(chunks) if n), default=0)
    for j in range(num_shards) if write else ():
        c, r = divmod(j, world)
        path = shard_path(output, j)
        if c >= chunks[r] and not shard_is_complete(path, [], feature_hash_):
            write_cache_shard(path, [], [], feature_hash_)
    return num_shards


def _start_output(output: Path, settings: dict[str, Any], accelerator: Any, args: BuildCacheArgs) -> None:
    """Refuse an output built with other settings (on every rank), then record ours and drop the old manifest."""
    check_build_lock(output, settings)
    _check_stream_layout(output, args, accelerator.num_processes)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (output / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(output / BUILD_LOCK, settings)
        if args.streaming:
            write_json_atomic(output / STREAM_LOCK, {"world_size": accelerator.num_processes})
        for stale in (MANIFEST_NAME, REPORT_NAME, REPORT_TEXT_NAME):  # rewritten at the end; absent = not finished
            (output / stale).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def run_build(args: BuildCacheArgs) -> Manifest | None:
    """Build (or finish) the cache; returns the manifest on rank 0 once complete, else None."""
    accelerator = _make_accelerator(args.device)
    device = accelerator.device
    compute_dtype = pick_dtype(args.dtype, device)
    zoo = _make_zoo(args, device, compute_dtype)
    settings = build_settings(args, zoo, compute_dtype)
    output = Path(args.output)
    try:
        return _build(args, accelerator, zoo, settings, output)
    except OSError as e:  # a full disk or a read-only output: one line with the errno, and what a re-run keeps
        raise BuildError(
            os_error_message(e, f"writing the cache {output}")
            + ". Then re-run the same command: complete shards are kept, the interrupted one is rebuilt"
        ) from e


def _build(args: BuildCacheArgs, accelerator: Any, zoo: Any, settings: dict[str, Any], output: Path) -> Manifest | None:
    rank, world = accelerator.process_index, accelerator.num_processes
    _start_output(output, settings, accelerator, args)
    items, total = list_inputs(args, rank, world)
    bar = tqdm(
        total=_owned_inputs(total, args.shard_size, rank, world),
        unit="sample",
        desc=f"cache build, rank {rank} of {world}",
        disable=not accelerator.is_local_main_process,
    )
    with CacheBuilder(args, zoo, settings, bar) as builder:
        num_shards = _build_shards(args, builder, items, rank, world)
    bar.close()
    if args.streaming:
        from accelerate.utils import gather_object

        chunks = gather_object([num_shards])  # every process's chunk count, in rank order
        num_shards = _fill_stream_gaps(output, chunks, feature_hash(settings), accelerator.is_main_process)
    if num_shards == 0:
        raise BuildError(f"no inputs found in {args.images or args.dataset or args.wds}")
    accelerator.wait_for_everyone()
    manifest = None
    if accelerator.is_main_process:
        manifest = _finish(output, num_shards, args.name or output.resolve().name, settings, args.buckets)
    accelerator.wait_for_everyone()
    return manifest


def _finish(
    output: Path, num_shards: int, name: str, settings: dict[str, Any], buckets: str | None = None
) -> Manifest | None:
    """Rank 0, after every rank: manifest + report when all shards are complete, else say how to finish. A bucket
    given by hand (`buckets`, not auto) that no image went to stops it before the manifest."""
    shards = [shard_path(output, j) for j in range(num_shards)]
    try:
        manifest = assemble_manifest(output, num_shards, name, settings)
    except CacheFormatError as e:
        sidecars = [read_sidecar(p) for p in shards]
        if all(s is not None and s["count"] == 0 for s in sidecars):  # complete, but every input was skipped
            write_report(output, shards)
            raise BuildError(str(e)) from e
        logger.warning("%s", e)
        return None
    for extra in sorted((output / SHARD_DIR).glob("shard-*.tar")):  # shards of an earlier, longer input list
        if int(extra.stem.split("-")[1]) >= num_shards:
            extra.unlink()
            extra.with_suffix(".json").unlink(missing_ok=True)
    empty = [f"{b['height']}x{b['width']}" for b in manifest.buckets if b["count"] == 0]
    if empty and buckets != "auto":
        write_report(output, shards)
        raise BuildError(
            f"--buckets {buckets}: no image went to bucket(s) {', '.join(empty)} (height x width); give only buckets "
            "near your images' aspect ratios, or 'auto', with a new --output"
        )
    write_manifest(output, manifest)
    write_report(output, shards)
    logger.info(
        "cache %s: %d samples in %d shards, %d inputs skipped (see %s)",
        output,
        manifest.num_samples,
        num_shards,
        manifest.num_skipped,
        output / REPORT_TEXT_NAME,
    )
    return manifest
