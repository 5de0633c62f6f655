"""In-memory feature caches: encodings (VAE latents, T5, CLIP), Lune and Sol teacher features at timestep buckets.

Teacher features vary with the timestep, so they are cached at T_BUCKETS (10 values of t) and interpolated linearly in
between (cache_format.interpolate_buckets, re-exported here). Every class saves to and loads from one safetensors file
(never pickle); a DatasetCache also converts to and from the sharded on-disk format of tinyflux.cache.format
(to_shards / from_shards).
Several datasets' caches are routed by dataset id in tinyflux.cache.multi_source (re-exported here).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tinyflux.cache.buckets import manifest_buckets
from tinyflux.cache.format import (
    T_BUCKETS,
    CacheFormatError,
    Manifest,
    assemble_manifest,
    decode_sample,
    feature_hash,
    feature_settings,
    interpolate_buckets,
    load_manifest,
    shard_path,
    shard_paths,
    write_cache_shard,
    write_manifest,
    write_report,
)
from tinyflux.cache.multi_source import MultiSourceCache
from tinyflux.frozen.sources import VAE_DOWNSAMPLE
from tinyflux.model.config import SOL_SPATIAL_SIZE
from tinyflux.util.dtypes import dtype_name

if TYPE_CHECKING:
    from tinyflux.frozen.zoo import ModelZoo

__all__ = [
    "DatasetCache",
    "EncodingCache",
    "LuneFeatureCache",
    "MultiSourceCache",  # lives in cache_multi_source; imported from here by the README's quick start
    "SolFeatureCache",
    "interpolate_buckets",
]

_FILE_FORMAT = "tinyflux-memory-cache"


def _save(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": _FILE_FORMAT, "kind": kind, "meta": json.dumps(meta)})


def _load(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CacheFormatError(
            f"{path} is not a safetensors cache file ({e}). TinyFlux never unpickles caches: rebuild it with "
            f"{kind}.build(...).save(path) or build_cache.py"
        ) from e
    if header.get("format") != _FILE_FORMAT or header.get("kind") not in (kind, "DatasetCache"):
        raise CacheFormatError(f"{path} holds a {header.get('kind')!r}, not a {kind}")
    return tensors, json.loads(header["meta"])


class EncodingCache:
    """VAE latents (N, C, H, W), T5 hidden states (N, L, K, D) with their lengths, CLIP pooled (N, P); + captions/keys."""

    def __init__(
        self,
        latents: torch.Tensor,
        t5_embeds: torch.Tensor,
        clip_pooled: torch.Tensor,
        dtype: torch.dtype = torch.float16,
        *,
        t5_lengths: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
    ):
        if t5_embeds.dim() == 3:  # (N, L, D): one T5 layer
            t5_embeds = t5_embeds.unsqueeze(2)
        n = latents.shape[0]
        if not t5_embeds.shape[0] == clip_pooled.shape[0] == n:
            raise ValueError(f"latents, t5_embeds, clip_pooled hold {n}, {t5_embeds.shape[0]}, {clip_pooled.shape[0]}")
        self.latents = latents.to(dtype)  # (N, C, H, W)
        self.t5_embeds = t5_embeds.to(dtype)  # (N, L, K, D)
        self.clip_pooled = clip_pooled.to(dtype)  # (N, P)
        full = torch.full((n,), t5_embeds.shape[1], dtype=torch.long)
        self.t5_lengths = full if t5_lengths is None else t5_lengths.long().cpu()  # (N,)
        self.captions = list(captions) if captions is not None else [""] * n
        self.keys = list(keys) if keys is not None else [f"{i:08d}" for i in range(n)]
        if not len(self.captions) == len(self.keys) == n:
            raise ValueError(f"{n} samples but {len(self.captions)} captions and {len(self.keys)} keys")

    @classmethod
    def build(
        cls,
        zoo: ModelZoo,
        images: list[Image.Image],
        prompts: list[str],
        batch_size: int = 32,
        *,
        resolution: int | None = None,
        keys: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> EncodingCache:
        """Encode images (resized / centre-cropped to `resolution` when given) and prompts with the zoo."""
        # Here, not at the top: training reads caches through this module and loads no encoder code.
        from tinyflux.cache.encode import prepare_image, text_features

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if resolution is not None:
            images = [prepare_image(im, resolution, min_side=0) for im in images]
        latents = zoo.encode_images_batched(images, batch_size=batch_size)
        t5, lengths, pooled = text_features(zoo, prompts)
        t5 = t5[:, : int(lengths.max())]  # nothing but zeros past the longest prompt
        return cls(latents, t5, pooled, dtype, t5_lengths=lengths, captions=prompts, keys=keys)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        n = int(self.t5_lengths[idx])
        return {
            "latents": self.latents[idx],  # (C, H, W)
            "t5_embeds": self.t5_embeds[idx, :n],  # (n, K, D), no padding
            "clip_pooled": self.clip_pooled[idx],  # (P,)
            "caption": self.captions[idx],
            "key": self.keys[idx],
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "latents": self.latents,
            "t5_embeds": self.t5_embeds,
            "t5_lengths": self.t5_lengths,
            "clip_pooled": self.clip_pooled,
        }

    def _meta(self) -> dict[str, Any]:
        return {"captions": self.captions, "keys": self.keys}

    @classmethod
    def _from(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> EncodingCache:
        return cls(
            tensors["latents"],
            tensors["t5_embeds"],
            tensors["clip_pooled"],
            tensors["latents"].dtype,
            t5_lengths=tensors["t5_lengths"],
            captions=meta["captions"],
            keys=meta["keys"],
        )

    def save(self, path: str) -> None:
        _save(path, "EncodingCache", self._tensors(), self._meta())

    @classmethod
    def load(cls, path: str) -> EncodingCache:
        return cls._from(*_load(path, "EncodingCache"))


class LuneFeatureCache:
    """Lune teacher features (N, T, lune_dim) at t_buckets (T,)."""

    def __init__(self, features: torch.Tensor, t_buckets: torch.Tensor, dtype: torch.dtype = torch.float16):
        if features.shape[1] != len(t_buckets):
            raise ValueError(f"features hold {features.shape[1]} buckets, t_buckets {len(t_buckets)}")
        self.features = features.to(dtype)  # (N, T, D)
        self.t_buckets = t_buckets.float().cpu()  # (T,)

    @classmethod
    def build(
        cls,
        zoo: ModelZoo,
        prompts: list[str],
        t_buckets: torch.Tensor = T_BUCKETS,
        batch_size: int = 64,
        batch_timesteps: bool = False,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
    ) -> LuneFeatureCache:
        from tinyflux.cache.encode import lune_features  # here: training loads no encoder code (EncodingCache.build)

        return cls(lune_features(zoo, prompts, t_buckets, seed, batch_size, batch_timesteps), t_buckets, dtype)

    def __len__(self) -> int:
        return self.features.shape[0]

    def get_features(self, indices: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) sample indices, (B,) timesteps -> (B, lune_dim) float32, linear between the cached buckets."""
        return interpolate_buckets(self.features[indices.long().cpu()], self.t_buckets, timesteps.cpu())

    def save(self, path: str) -> None:
        _save(path, "LuneFeatureCache", {"lune": self.features, "lune_t_buckets": self.t_buckets}, {})

    @classmethod
    def load(cls, path: str) -> LuneFeatureCache:
        tensors, _ = _load(path, "LuneFeatureCache")
        return cls(tensors["lune"], tensors["lune_t_buckets"], tensors["lune"].dtype)


class SolFeatureCache:
    """Sol teacher stats (N, T, n) and spatial maps (N, T, S, S). The n columns are the first n of (locality, entropy,
    clustering, sparsity): 4 in our builds, 3 in a converted original cache (Manifest.sol_stats_names says which)."""

    def __init__(
        self,
        stats: torch.Tensor,
        spatial: torch.Tensor,
        t_buckets: torch.Tensor,
        dtype: torch.dtype = torch.float16,
    ):
        if not stats.shape[1] == spatial.shape[1] == len(t_buckets):
            raise ValueError(
                f"stats / spatial hold {stats.shape[1]} / {spatial.shape[1]} buckets, not {len(t_buckets)}"
            )
        self.stats = stats.to(dtype)  # (N, T, n)
        self.spatial = spatial.to(dtype)  # (N, T, S, S)
        self.t_buckets = t_buckets.float().cpu()  # (T,)

    @classmethod
    def build(
        cls,
        zoo: ModelZoo,
        prompts: list[str],
        t_buckets: torch.Tensor = T_BUCKETS,
        spatial_size: int = SOL_SPATIAL_SIZE,
        batch_size: int = 64,
        batch_timesteps: bool = True,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
    ) -> SolFeatureCache:
        from tinyflux.cache.encode import sol_features  # here: training loads no encoder code (EncodingCache.build)

        stats, spatial = sol_features(zoo, prompts, t_buckets, seed, batch_size, batch_timesteps, spatial_size)
        return cls(stats, spatial, t_buckets, dtype)

    def __len__(self) -> int:
        return self.stats.shape[0]

    def get_features(self, indices: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) indices, (B,) timesteps -> stats (B, n), spatial (B, S, S), float32, linear between buckets."""
        idx, t = indices.long().cpu(), timesteps.cpu()
        return interpolate_buckets(self.stats[idx], self.t_buckets, t), interpolate_buckets(
            self.spatial[idx], self.t_buckets, t
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"sol_stats": self.stats, "sol_spatial": self.spatial, "sol_t_buckets": self.t_buckets.clone()}

    def save(self, path: str) -> None:
        _save(path, "SolFeatureCache", self._tensors(), {})

    @classmethod
    def load(cls, path: str) -> SolFeatureCache:
        tensors, _ = _load(path, "SolFeatureCache")
        return cls(tensors["sol_stats"], tensors["sol_spatial"], tensors["sol_t_buckets"], tensors["sol_stats"].dtype)


class DatasetCache:
    """Encodings plus optional Lune / Sol features of one dataset. `settings` records how the features were made
    (t5_layers, resolution, seed, sources, ...): to_shards writes them into the manifest."""

    def __init__(
        self,
        encodings: EncodingCache,
        lune: LuneFeatureCache | None = None,
        sol: SolFeatureCache | None = None,
        name: str = "dataset",
        *,
        settings: dict[str, Any] | None = None,
    ):
        for part in (lune, sol):
            if part is not None and len(part) != len(encodings):
                raise ValueError(f"{type(part).__name__} holds {len(part)} samples, the encodings {len(encodings)}")
        self.encodings, self.lune, self.sol, self.name = encodings, lune, sol, name
        self.settings = dict(settings or {})

    @classmethod
    def build(
        cls,
        zoo: ModelZoo,
        images: list[Image.Image],
        prompts: list[str],
        name: str = "dataset",
        extract_lune: bool = True,
        extract_sol: bool = True,
        *,
        resolution: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        keys: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> DatasetCache:
        encodings = EncodingCache.build(zoo, images, prompts, batch_size, resolution=resolution, keys=keys, dtype=dtype)
        lune = LuneFeatureCache.build(zoo, prompts, seed=seed, dtype=dtype) if extract_lune else None
        sol = SolFeatureCache.build(zoo, prompts, seed=seed, dtype=dtype) if extract_sol else None
        settings = {
            "resolution": encodings.latents.shape[-1] * VAE_DOWNSAMPLE,
            "t5_layers": list(zoo.t5_layers),
            "seed": seed,
            "sources": {"vae": zoo.vae_repo, "t5": zoo.t5_repo, "clip": zoo.clip_repo, "experts": zoo.experts_repo},
            "compute_dtype": dtype_name(zoo.dtype),
            "storage_dtype": dtype_name(dtype),
        }
        return cls(encodings, lune, sol, name, settings=settings)

    def __len__(self) -> int:
        return len(self.encodings)

    @property
    def t_buckets(self) -> torch.Tensor | None:
        part = self.lune or self.sol
        return part.t_buckets if part is not None else None

    def sample(self, idx: int) -> dict[str, Any]:
        """One sample in the shape the stream yields (see tinyflux.cache.loaders): tensors, caption, key, index."""
        out = self.encodings[idx]
        if self.lune is not None:
            out["lune"] = self.lune.features[idx]  # (T, lune_dim)
        if self.sol is not None:
            out["sol_stats"], out["sol_spatial"] = self.sol.stats[idx], self.sol.spatial[idx]  # (T, 4), (T, S, S)
        if self.t_buckets is not None:
            out["t_buckets"] = self.t_buckets
        out["index"] = idx
        return out

    def save(self, path: str) -> None:
        tensors = self.encodings._tensors()
        if self.lune is not None:
            tensors.update(lune=self.lune.features, lune_t_buckets=self.lune.t_buckets.clone())
        if self.sol is not None:
            tensors.update(self.sol._tensors())
        _save(path, "DatasetCache", tensors, {**self.encodings._meta(), "name": self.name, "settings": self.settings})

    @classmethod
    def load(cls, path: str) -> DatasetCache:
        tensors, meta = _load(path, "DatasetCache")
        lune = (
            LuneFeatureCache(tensors["lune"], tensors["lune_t_buckets"], tensors["lune"].dtype)
            if "lune" in tensors
            else None
        )
        sol = None
        if "sol_stats" in tensors:
            sol = SolFeatureCache(
                tensors["sol_stats"], tensors["sol_spatial"], tensors["sol_t_buckets"], tensors["sol_stats"].dtype
            )
        return cls(
            EncodingCache._from(tensors, meta), lune, sol, meta.get("name", "dataset"), settings=meta.get("settings")
        )

    def shard_settings(self) -> dict[str, Any]:
        """The feature settings a manifest of this cache records (and hashes)."""
        missing = [k for k in ("t5_layers",) if k not in self.settings]
        if missing:
            raise ValueError(
                f"DatasetCache.settings lacks {missing}: pass settings={{'t5_layers': [...]}} to record them"
            )
        return feature_settings(
            resolution=self.settings.get("resolution", self.encodings.latents.shape[-1] * VAE_DOWNSAMPLE),
            t5_layers=self.settings["t5_layers"],
            seed=self.settings.get("seed", 0),
            sources=self.settings.get("sources", {"origin": "in-memory DatasetCache"}),
            compute_dtype=self.settings.get("compute_dtype", "float32"),
            storage_dtype=dtype_name(self.encodings.latents.dtype),
            lune=self.lune is not None,
            sol=self.sol is not None,
            t_buckets=self.t_buckets if self.t_buckets is not None else T_BUCKETS,
            text_regime=self.settings.get("text_regime", "masked"),
            latent_shift=self.settings.get("latent_shift", True),
        )

    def to_shards(self, cache_dir: str | Path, shard_size: int = 1000) -> Manifest:
        """Write this cache in the on-disk shard format (manifest, report, shards) that build_cache.py writes."""
        settings = self.shard_settings()
        fhash = feature_hash(settings)
        num_shards = max(1, -(-len(self) // shard_size))
        for j in range(num_shards):
            rows = range(j * shard_size, min(len(self), (j + 1) * shard_size))
            samples = []
            for i in rows:
                s = self.sample(i)
                tensors = {k: v for k, v in s.items() if isinstance(v, torch.Tensor) and k != "t_buckets"}
                meta = {"input_index": i, "t5_length": tensors["t5_embeds"].shape[0]}
                samples.append((s["key"], s["caption"], tensors, meta))
            write_cache_shard(shard_path(cache_dir, j), samples, [self.encodings.keys[i] for i in rows], fhash)
        manifest = assemble_manifest(cache_dir, num_shards, self.name, settings)
        write_manifest(cache_dir, manifest)
        write_report(cache_dir, shard_paths(cache_dir, manifest))
        return manifest

    @classmethod
    def from_shards(cls, cache_dir: str | Path) -> DatasetCache:
        """Read a shard set back into memory; sample i is the i-th sample in manifest shard order (its stream index)."""
        manifest = load_manifest(cache_dir)
        if len(manifest_buckets(manifest)) > 1:
            raise CacheFormatError(
                f"{cache_dir} holds aspect buckets, whose latents do not stack into one tensor: read it with "
                "tinyflux.cache.bucket_loader.BucketSamples (train_tinyflux.py --in_memory does)"
            )
        urls = [{"url": str(p)} for p in shard_paths(cache_dir, manifest)]
        samples = [decode_sample(raw) for raw in wds.tarfile_samples(urls)]
        if len(samples) != manifest.num_samples:
            raise CacheFormatError(
                f"{cache_dir}: the shards hold {len(samples)} samples, the manifest {manifest.num_samples}"
            )
        lengths = torch.tensor([s["t5_embeds"].shape[0] for s in samples])
        t5 = torch.zeros(
            len(samples), int(lengths.max()), *samples[0]["t5_embeds"].shape[1:], dtype=samples[0]["t5_embeds"].dtype
        )
        for i, s in enumerate(samples):
            t5[i, : lengths[i]] = s["t5_embeds"]
        dtype = samples[0]["latents"].dtype
        encodings = EncodingCache(
            torch.stack([s["latents"] for s in samples]),
            t5,
            torch.stack([s["clip_pooled"] for s in samples]),
            dtype,
            t5_lengths=lengths,
            captions=[s["caption"] for s in samples],
            keys=[s["key"] for s in samples],
        )
        t_buckets = torch.tensor(manifest.t_buckets)
        lune = (
            LuneFeatureCache(torch.stack([s["lune"] for s in samples]), t_buckets, dtype) if manifest.has_lune else None
        )
        sol = None
        if manifest.has_sol:
            sol = SolFeatureCache(
                torch.stack([s["sol_stats"] for s in samples]),
                torch.stack([s["sol_spatial"] for s in samples]),
                t_buckets,
                dtype,
            )
        return cls(encodings, lune, sol, manifest.name, settings=manifest.settings)
