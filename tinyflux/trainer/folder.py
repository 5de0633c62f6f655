"""Train from an image folder: `train_tinyflux.py --images DIR` caches the folder with build_cache's builder, then
trains on that cache.

The cache goes to ROOT/<resolution>px-<fingerprint>/ (ROOT: --cache_dir, default DIR/.tinyflux_cache). The fingerprint
hashes the folder's images and captions (relative path, size, modification time) and the build settings that shape
the features (resolution, T5 layers, text regime, latent shift, model sources, teachers), so an unchanged folder
reuses its cache without loading an encoder, and a changed folder or setting gets a new cache beside the older ones
(which stay until deleted). Under several processes every process joins the build (each encodes its own shards,
rank 0 writes the manifest; cache_build.py), and every process reaches the same decision from the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from tinyflux.cache.build import BuildCacheArgs, run_build
from tinyflux.cache.format import MANIFEST_NAME, write_json_atomic
from tinyflux.cache.inputs import IMAGE_EXTENSIONS, BuildError
from tinyflux.model.config import TinyFluxConfig

logger = logging.getLogger(__name__)

CACHE_SUBDIR = ".tinyflux_cache"
FOLDER_RECORD = "folder.json"  # what a folder cache was built from; written last, so its presence means complete
# BuildCacheArgs fields that change how a build runs, not what it writes: left out of the fingerprint.
RUN_ONLY_FIELDS = ("output", "images", "batch_size", "num_loaders", "device", "name", "stop_after_shards")
SHARD_SIZE = 256  # a small fine-tune's folder fits a few shards; more shards let several processes share the build


@dataclass(frozen=True)
class ImageFolder:
    """What a --images run caches: the folder, at what square side in pixels, through which zoo (a directory, "hub"
    or None: the real models), where its cache goes (default IMAGES/.tinyflux_cache), with which aspect buckets."""

    images: str
    resolution: int = 512
    zoo: str | None = None
    cache_dir: str | None = None
    buckets: str | None = None


def build_args(folder: ImageFolder, config: TinyFluxConfig, output: Path) -> BuildCacheArgs:
    """The build_cache.py arguments of a --images run: the model's T5 layers, text regime and latent convention, the
    teachers its experts read, the --zoo (or the real models), the --resolution."""
    return BuildCacheArgs(
        output=str(output),
        images=folder.images,
        resolution=folder.resolution,
        shard_size=SHARD_SIZE,
        t5_layers=list(config.t5_layers),
        text_regime=config.text_regime,
        latent_shift=config.latent_shift,
        zoo=None if folder.zoo in (None, "hub") else folder.zoo,
        no_lune=not config.use_lune_expert,
        no_sol=not config.use_sol_prior,
        name=Path(folder.images).resolve().name,
        buckets=folder.buckets,
    )


def folder_files(images: Path, skip: Path) -> list[list[Any]]:
    """[relative path, size, mtime_ns] of every image and caption under `images` (not under `skip`), sorted."""
    skip = skip.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(images):
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).resolve() != skip]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt"):
                stat = path.stat()
                files.append([path.relative_to(images).as_posix(), stat.st_size, stat.st_mtime_ns])
    return sorted(files)


def folder_cache_dir(folder: ImageFolder, config: TinyFluxConfig) -> tuple[Path, dict[str, Any]]:
    """Where the cache of this folder and these settings lives, and the record that names what it was built from."""
    images = Path(folder.images)
    root = Path(folder.cache_dir) if folder.cache_dir else images / CACHE_SUBDIR
    settings = dataclasses.asdict(build_args(folder, config, root))
    settings = {k: v for k, v in settings.items() if k not in RUN_ONLY_FIELDS}
    record = {"files": folder_files(images, root), "build": settings}
    if not record["files"]:
        raise BuildError(f"--images {images}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{folder.resolution}px-{key}", {"images": str(images.resolve()), **record}


def prepare_folder_cache(folder: ImageFolder, config: TinyFluxConfig, ddp_timeout: int = 1800) -> Path:
    """The cache directory of --images: reused when the folder and settings are unchanged, else built (on every
    process; see the module docstring). Returns it. `ddp_timeout`: seconds of the process group's collectives."""
    output, record = folder_cache_dir(folder, config)
    if (output / FOLDER_RECORD).is_file() and (output / MANIFEST_NAME).is_file():
        logger.info("--images %s: folder and settings unchanged, reusing the cache %s", folder.images, output)
        return output
    older = sorted(str(d) for d in output.parent.glob("*") if (d / FOLDER_RECORD).is_file())
    if older:
        logger.warning(
            "--images %s changed since its cache was built (images, captions or build settings): building %s; the "
            "older cache(s) %s stay until you delete them",
            folder.images,
            output,
            ", ".join(older),
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The build's Accelerator would start the process group with its day-long barrier timeout, and the training
        # after it would inherit that: start the group with the run's ddp_timeout (a folder's build takes minutes).
        PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=ddp_timeout))
    manifest = run_build(build_args(folder, config, output))  # every process: the build is collective
    if manifest is not None:  # rank 0, once the cache is complete
        write_json_atomic(output / FOLDER_RECORD, record)
    if not (output / MANIFEST_NAME).is_file():
        raise BuildError(
            f"--images {folder.images}: the cache build in {output} did not finish; run again to finish it"
        )
    return output
