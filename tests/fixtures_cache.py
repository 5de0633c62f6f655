"""Fixtures for small feature caches (owned by the cache tests).

Synthetic caches (random tensors at the `tiny` preset's sizes, written by the real shard writer) need no zoo; the
built caches run build_cache's pipeline on the tiny zoo over a small demo image folder with bad inputs mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyflux.cache.format import T_BUCKETS, Manifest
from tinyflux.cache.memory import DatasetCache, EncodingCache, LuneFeatureCache, SolFeatureCache
from tinyflux.model.config import TinyFluxConfig
from tinyflux.tools.demo_images import write_demo_images

TINY = TinyFluxConfig.preset("tiny")
# Inputs the demo folder holds besides the good images, with the reason the build must give for each.
BAD_INPUTS = {
    "corrupt": "corrupt_image",
    "no_caption": "missing_caption",
    "blank_caption": "empty_caption",
    "small": "too_small",
    "twin": "duplicate_key",
}


def make_synthetic_cache(
    n: int, seed: int = 0, lune: bool = True, sol: bool = True, name: str = "synthetic"
) -> DatasetCache:
    """A DatasetCache of random features at the tiny preset's sizes: 8x8 latents, T5 lengths 3..8 of (K=2, D=64)."""
    g = torch.Generator().manual_seed(seed)
    k, d, t = len(TINY.t5_layers), TINY.t5_hidden_size, len(T_BUCKETS)
    lengths = torch.randint(3, 9, (n,), generator=g)
    t5 = torch.randn(n, 8, k, d, generator=g)
    t5[torch.arange(8)[None, :] >= lengths[:, None]] = 0  # zero past each length, as the zoo returns them
    encodings = EncodingCache(
        torch.randn(n, TINY.in_channels, 8, 8, generator=g),
        t5,
        torch.randn(n, TINY.pooled_projection_dim, generator=g),
        t5_lengths=lengths,
        captions=[f"caption {seed}-{i}" for i in range(n)],
        keys=[f"s{seed}-{i:04d}" for i in range(n)],
    )
    lune_cache = LuneFeatureCache(torch.randn(n, t, TINY.lune_expert_dim, generator=g), T_BUCKETS) if lune else None
    sol_cache = None
    if sol:
        spatial = torch.rand(n, t, 8, 8, generator=g)
        sol_cache = SolFeatureCache(
            torch.rand(n, t, 4, generator=g), spatial / spatial.sum((-1, -2), keepdim=True), T_BUCKETS
        )
    return DatasetCache(encodings, lune_cache, sol_cache, name, settings={"t5_layers": list(TINY.t5_layers)})


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """37 synthetic samples with Lune and Sol in shards of 5 (the last holds 2)."""
    out = tmp_path_factory.mktemp("synthetic_a")
    make_synthetic_cache(37, seed=0).to_shards(out, shard_size=5)
    return out


@pytest.fixture(scope="session")
def synthetic_shards_no_sol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic samples with Lune only, in shards of 6: a second source to mix with synthetic_shards."""
    out = tmp_path_factory.mktemp("synthetic_b")
    make_synthetic_cache(20, seed=1, sol=False, name="no_sol").to_shards(out, shard_size=6)
    return out


def write_demo_folder(root: Path, n: int = 10) -> tuple[list[str], dict[str, str]]:
    """n demo images plus one input per BAD_INPUTS entry; returns (keys of usable images, {bad key: reason})."""
    write_demo_images(root, n=n, size=64, seed=0)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really a png")
    (root / "corrupt.txt").write_text("a corrupt file")
    Image.new("RGB", (64, 64), "red").save(root / "no_caption.png")
    Image.new("RGB", (64, 64), "red").save(root / "blank_caption.png")
    (root / "blank_caption.txt").write_text("  \n")
    Image.new("RGB", (20, 40), "red").save(root / "small.png")
    (root / "small.txt").write_text("a tiny red image")
    # twin.jpg and twin.png share the key "twin": the first in sorted order (.jpg) is kept, twin.png reported
    Image.new("RGB", (80, 64), "blue").save(root / "twin.jpg")
    Image.new("RGB", (64, 64), "green").save(root / "twin.png")
    (root / "twin.txt").write_text("a blue rectangle")
    good = sorted([f"{i:05d}" for i in range(n)] + ["twin"])
    return good, dict(BAD_INPUTS)


@dataclass
class BuiltCache:
    """A cache build_cache's pipeline wrote from the demo folder (treat as read-only)."""

    images: Path
    output: Path
    manifest: Manifest
    good_keys: list[str]
    bad: dict[str, str]
    zoo: Path

    def build_kwargs(self) -> dict:
        """The BuildCacheArgs fields of this build, minus the output."""
        return dict(
            images=str(self.images),
            zoo=str(self.zoo),
            model_preset="tiny",
            resolution=64,
            shard_size=4,
            batch_size=4,
            num_loaders=2,
            name="demo",
        )


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory, tiny_zoo_path: Path) -> BuiltCache:
    """The demo folder (10 good images, 5 bad inputs, one of them a duplicate key) built at 64 px in shards of 4."""
    from tinyflux.cache.build import BuildCacheArgs, run_build

    images = tmp_path_factory.mktemp("demo_images")
    good, bad = write_demo_folder(images)
    output = tmp_path_factory.mktemp("demo_cache") / "cache"
    built = BuiltCache(images, output, None, good, bad, tiny_zoo_path)  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built.manifest = run_build(BuildCacheArgs(output=str(output), **built.build_kwargs()))
    finally:
        torch.set_num_threads(threads)
    return built
