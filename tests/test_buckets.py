"""Aspect-ratio buckets: build_cache.py --buckets, square builds unchanged, old caches as one square bucket."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from tinyflux.data.demo import write_demo_images
from tinyflux.trainer.cache_build import BuildCacheArgs, run_build

SNAPSHOT_DIR = Path(__file__).parent / "data" / "square_cache"
# Manifest entries that name this machine's paths or hash the tar bytes (which the tensors' comparison covers).
_MACHINE_KEYS = ("sources", "settings", "shards", "feature_hash", "tinyflux_version")


def square_build_snapshot(tmp: Path, zoo: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A small square build with both teachers (3 demo images and an 80x64 one, cropped): its tensors by
    "key/name", every member's name with the caption and metadata, and its manifest less the machine's paths."""
    images = tmp / "square_images"
    write_demo_images(images, n=3, size=64, seed=0)
    Image.new("RGB", (80, 64), "blue").save(images / "wide.png")
    (images / "wide.txt").write_text("a blue rectangle")
    output = tmp / "square_cache"
    manifest = run_build(
        BuildCacheArgs(
            output=str(output), images=str(images), zoo=str(zoo), model_preset="tiny", resolution=64,
            shard_size=2, batch_size=2, num_loaders=1,
        )
    )  # fmt: skip
    tensors, members = {}, {}
    for shard in manifest.shards:
        with tarfile.open(output / shard["name"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                key, ext = member.name.split(".", 1)
                if ext == "safetensors":
                    tensors |= {f"{key}/{name}": t for name, t in load_tensors(data).items()}
                else:
                    members[member.name] = data.decode()
    d = manifest.to_dict()
    d["settings"] = {k: v for k, v in d["settings"].items() if k != "sources"}
    return tensors, members, {k: v for k, v in d.items() if k not in _MACHINE_KEYS} | {"settings": d["settings"]}
