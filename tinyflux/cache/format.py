"""The on-disk cache format: samples in webdataset shards, the manifest, and the compatibility check.

A cache directory holds `manifest.json`, `report.json` / `report.txt` (inputs the build skipped and why) and
`shards/shard-NNNNNN.tar`, each with a `shard-NNNNNN.json` sidecar. A sample is three tar members sharing a key:
`KEY.safetensors` (every tensor of the sample), `KEY.txt` (the caption) and `KEY.json` (small metadata). Plain `tar`,
`webdataset` and `safetensors` read it; nothing is pickled. docs/CACHE_FORMAT.md describes every field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from webdataset import TarWriter

from tinyflux.cache.buckets import manifest_buckets
from tinyflux.errors import TinyFluxError
from tinyflux.model.config import PRESETS, SOL_STATS, TinyFluxConfig
from tinyflux.util.dtypes import dtype_name

FORMAT_NAME = "tinyflux-cache"
FORMAT_VERSION = 1
# The one owner of the timestep buckets: teacher features are cached at these t (TinyFlux convention, t=1 is data).
T_BUCKETS = torch.linspace(0.05, 0.95, 10)
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
REPORT_TEXT_NAME = "report.txt"
SHARD_DIR = "shards"
# Tensors of one sample, in the order the docs list them; lune / sol entries are absent when the build skipped them.
ENCODING_TENSORS = ("latents", "t5_embeds", "clip_pooled")
TEACHER_TENSORS = {"lune": ("lune",), "sol": ("sol_stats", "sol_spatial")}
SAMPLE_TENSORS = ENCODING_TENSORS + TEACHER_TENSORS["lune"] + TEACHER_TENSORS["sol"]
# Fixed tar header fields make a rebuilt shard byte-identical to the first build of it.
_TAR_FIELDS = dict(user="tinyflux", group="tinyflux", mode=0o444, mtime=0)  # int: a float mtime costs a pax header


def interpolate_buckets(features: torch.Tensor, t_buckets: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Features (B, T, ...) cached at t_buckets (T,) ascending -> features at t (B,): (B, ...) float32.

    Linear between the two neighbouring buckets, clamped to the first / last bucket outside them; exact at a bucket.
    """
    features = features.float()
    t_buckets = t_buckets.to(features.device, torch.float32)
    if features.shape[1] == 1:
        return features[:, 0]
    t = t.to(features.device, torch.float32).clamp(t_buckets[0], t_buckets[-1])  # (B,)
    lo = (torch.searchsorted(t_buckets, t, right=True) - 1).clamp(0, len(t_buckets) - 2)  # (B,)
    w = (t - t_buckets[lo]) / (t_buckets[lo + 1] - t_buckets[lo])  # (B,) in [0, 1]
    w = w.view(-1, *([1] * (features.dim() - 2)))
    rows = torch.arange(features.shape[0], device=features.device)
    # (1 - w) * a + w * b, not lerp's a + w * (b - a): the form that gives a exactly at w=0 and b exactly at w=1
    return (1 - w) * features[rows, lo] + w * features[rows, lo + 1]


class CacheFormatError(TinyFluxError, ValueError):
    """A cache directory or shard that cannot be read as a TinyFlux cache."""


class CacheMismatchError(TinyFluxError, ValueError):
    """A cache whose features do not fit the model config (see check_compatible)."""


def shard_name(index: int) -> str:
    """Shard j's file name. It holds no rank: whichever process (and world size) builds shard j writes the same file."""
    return f"shard-{index:06d}.tar"


def shard_path(cache_dir: str | Path, index: int) -> Path:
    return Path(cache_dir) / SHARD_DIR / shard_name(index)


def sidecar_path(tar_path: str | Path) -> Path:
    return Path(tar_path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def repair_hint(cache_dir: str | Path) -> str:
    return (
        f"re-run the build_cache.py command that wrote {cache_dir} (same --output): it keeps the intact shards and "
        "rebuilds this one"
    )


def verify_shard(path: str | Path, entry: dict[str, Any], cache_dir: str | Path, hash_bytes: bool = True) -> None:
    """Raise CacheFormatError naming the shard and the repair when it is not the file its manifest `entry` lists:
    another size (truncated, appended to), or with `hash_bytes` another sha256 (same-size corruption)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CacheFormatError(f"shard {path} cannot be read ({e}); {repair_hint(cache_dir)}") from e
    if size != entry["bytes"]:
        problem = f"is {size} bytes, the manifest says {entry['bytes']}"
    elif hash_bytes and file_sha256(path) != entry["sha256"]:
        problem = "has the right size but not the sha256 the manifest lists (its bytes changed)"
    else:
        return
    raise CacheFormatError(f"shard {path} is damaged: it {problem}; {repair_hint(cache_dir)}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to `path.tmp`, then rename: readers see the old file or the complete new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def encode_sample(key: str, caption: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """One sample as tar members: KEY.safetensors (all tensors), KEY.txt (caption), KEY.json (meta)."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains '.', which webdataset reads as an extension separator")
    unknown = sorted(set(tensors) - set(SAMPLE_TENSORS))
    if unknown:
        raise ValueError(f"unknown sample tensors {unknown}; a sample holds {SAMPLE_TENSORS}")
    # clone: a row of a batch tensor would otherwise be serialised through its whole batch storage
    payload = {name: tensors[name].detach().cpu().contiguous().clone() for name in SAMPLE_TENSORS if name in tensors}
    return {
        "__key__": key,
        "safetensors": save_tensors(payload),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Inverse of encode_sample for a webdataset sample dict: {'key', 'caption', 'meta', tensor names...}."""
    missing = [ext for ext in ("safetensors", "txt", "json") if ext not in raw]
    if missing:
        raise CacheFormatError(f"sample {raw.get('__key__')!r} in {raw.get('__url__')} lacks members {missing}")
    sample: dict[str, Any] = dict(load_tensors(raw["safetensors"]))
    sample["key"] = raw["__key__"]
    sample["caption"] = raw["txt"].decode("utf-8")
    sample["meta"] = json.loads(raw["json"])
    return sample


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]], sidecar: dict[str, Any]) -> dict[str, Any]:
    """Write encoded samples to the shard `path`, committing it last.

    Order: any old shard at `path` is removed, samples go to `path.tmp`, the sidecar (`sidecar` plus count, bytes and
    sha256) is written atomically, and only then is `path.tmp` renamed to `path`. The shard exists under its final name
    only when complete, and a shard whose sidecar does not match it never passes for complete (see shard_is_complete).
    Returns the sidecar as written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with TarWriter(str(tmp), encoder=False, **_TAR_FIELDS) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1
        data = tmp.read_bytes()
        sidecar = {**sidecar, "name": f"{SHARD_DIR}/{path.name}", "count": count, "bytes": len(data)}
        sidecar["sha256"] = hashlib.sha256(data).hexdigest()
        write_json_atomic(sidecar_path(path), sidecar)
    except BaseException:  # a full disk, a kill: no partial .tar.tmp (or sidecar .tmp) stays behind
        tmp.unlink(missing_ok=True)
        sidecar_path(path).with_name(sidecar_path(path).name + ".tmp").unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return sidecar


def write_cache_shard(
    path: str | Path,
    samples: Sequence[tuple[str, str, dict[str, torch.Tensor], dict[str, Any]]],
    input_keys: Sequence[str],
    feature_hash: str,
    *,
    skipped: Sequence[dict[str, Any]] = (),
    bucketed: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The one writer of a cache's shards (build_cache.py, DatasetCache.to_shards, a streamed build's empty shards):
    samples (key, caption, tensors, meta) in stream order, and a sidecar of the input keys the shard was built from,
    the inputs skipped, the feature hash, the fields of a sample and its T5 lengths, then `extra` (bucket_counts,
    stream_state). Returns the sidecar as written (write_shard)."""
    lengths = [tensors["t5_embeds"].shape[0] for _, _, tensors, _ in samples]
    sidecar = {
        "input_keys": list(input_keys),
        "skipped": list(skipped),
        "feature_hash": feature_hash,
        "fields": fields_of(samples[-1][2], bucketed=bucketed) if samples else {},
        "t5_length_sum": sum(lengths),
        "t5_length_max": max(lengths, default=0),
        **extra,
    }
    return write_shard(path, [encode_sample(*sample) for sample in samples], sidecar)


def read_sidecar(tar_path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a complete shard, or None when the shard or its sidecar is missing or unreadable."""
    tar_path = Path(tar_path)
    side = sidecar_path(tar_path)
    if not (tar_path.is_file() and side.is_file()):
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError:
        return None


def shard_is_complete(tar_path: str | Path, input_keys: list[str], feature_hash: str) -> bool:
    """True when the shard exists, was built from exactly these input keys with these feature settings, and its bytes
    are the ones its sidecar hashed (size first, then sha256: a same-size corruption is rebuilt, not kept)."""
    side = read_sidecar(tar_path)
    return (
        side is not None
        and side.get("input_keys") == input_keys
        and side.get("feature_hash") == feature_hash
        and side.get("bytes") == Path(tar_path).stat().st_size
        and side.get("sha256") == file_sha256(tar_path)
    )


def fields_of(tensors: dict[str, torch.Tensor], bucketed: bool = False) -> dict[str, dict[str, Any]]:
    """FieldSpec dicts of one sample's tensors; the T5 length (first axis of t5_embeds) is recorded as None, and in a
    cache of aspect buckets (`bucketed`) the latents' height and width too (each sample's meta and the manifest's
    buckets give them)."""
    out = {}
    for name in SAMPLE_TENSORS:
        if name in tensors:
            shape: list[int | None] = list(tensors[name].shape)
            if name == "t5_embeds":
                shape[0] = None
            if name == "latents" and bucketed:
                shape[1:] = [None, None]
            out[name] = {"shape": shape, "dtype": dtype_name(tensors[name].dtype)}
    return out


def feature_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of every setting that changes the cached features (sources, sizes, seed, dtypes, ...)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def feature_settings(
    *,
    resolution: int,
    t5_layers: Iterable[int],
    seed: int,
    sources: dict[str, str],
    compute_dtype: str,
    storage_dtype: str,
    lune: bool,
    sol: bool,
    t_buckets: torch.Tensor = T_BUCKETS,
    text_regime: str = "masked",
    latent_shift: bool = True,
    buckets: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Every setting that changes the cached features; the manifest stores it and feature_hash hashes it.

    `buckets` ([height, width] each, from --buckets) enters only when given, so a square build hashes as before.

    text_regime "padded" (all 128 T5 states kept, pads included: what the released v4.2 weights read) enters the
    settings only when chosen, so the hash of a masked cache is what it was before the regime existed.
    """
    regime = {"text_regime": text_regime} if text_regime != "masked" else {}
    if not latent_shift:  # likewise: only the released convention (no VAE shift) enters the settings
        regime["latent_shift"] = False
    if buckets:
        regime["buckets"] = [[int(h), int(w)] for h, w in buckets]
        regime["bucket_resize"] = "nearest log aspect ratio; cover the bucket (Lanczos), centre crop"
        regime["teacher_grid"] = "bucket latent grid x teacher sample_size / (resolution / 8), rounded"
    return {
        **regime,
        "format_version": FORMAT_VERSION,
        "resolution": int(resolution),
        "resize": "shorter side to resolution (Lanczos), centre crop",
        # the decoding rules of cache_encode.to_rgb8: a cache decoded by other rules is not finished with these
        "decode": "EXIF orientation; 16-bit and I / 65535, F as 0..1, alpha onto white, else PIL's RGB",
        "t5_layers": [int(i) for i in t5_layers],
        "t_buckets": [float(t) for t in t_buckets],  # float32 values, exact in JSON
        "seed": int(seed),
        "sources": dict(sorted(sources.items())),
        "compute_dtype": compute_dtype,
        "storage_dtype": storage_dtype,
        "lune": bool(lune),
        "sol": bool(sol),
    }


@dataclass
class FieldSpec:
    """Per-sample shape (None = varies: the T5 length) and storage dtype of one tensor."""

    shape: list[int | None]
    dtype: str


@dataclass
class Manifest:
    """What a cache holds and how it was made; written by the build once every shard is complete."""

    name: str
    num_samples: int
    shards: list[dict[str, Any]]  # {"name": "shards/shard-000000.tar", "count", "bytes", "sha256"}
    fields: dict[str, FieldSpec]  # per SAMPLE_TENSORS name present in the samples
    t_buckets: list[float]
    resolution: int
    t5_layers: list[int]
    seed: int
    sources: dict[str, str]  # vae / t5 / clip / lune / sol -> repo id or path
    compute_dtype: str
    storage_dtype: str
    feature_hash: str
    num_inputs: int = 0
    num_skipped: int = 0
    t5_length_mean: float = 0.0
    t5_length_max: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # the exact dict feature_hash was computed from
    text_regime: str = "masked"  # "masked": real T5 tokens only; "padded": all 128 states, T5's pad outputs included
    sol_stats_names: list[str] = field(default_factory=lambda: list(SOL_STATS))  # the columns of sol_stats, in order
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    tinyflux_version: str = ""
    # --buckets: {"height", "width", "count"} per bucket (pixels) in the build's order; empty for a square cache,
    # which reads as one square bucket (tinyflux.cache.buckets.manifest_buckets)
    buckets: list[dict[str, int]] = field(default_factory=list)

    @property
    def has_lune(self) -> bool:
        return "lune" in self.fields

    @property
    def has_sol(self) -> bool:
        return "sol_stats" in self.fields and "sol_spatial" in self.fields

    @property
    def latent_shift(self) -> bool:
        """Whether the latents are (z - shift_factor) * scale (builds by default) or z * scale (the original's)."""
        if "latent_shift" in self.settings:
            return bool(self.settings["latent_shift"])
        return "shift_factor not subtracted" not in self.settings.get("latent_convention", "")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every sample's latents; in a cache of several buckets, those of its first bucket."""
        c, h, w = self.fields["latents"].shape
        if h is None:
            h, w = (self.buckets[0][k] // 8 for k in ("height", "width"))
        return int(c), int(h), int(w)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.buckets:  # a square cache's manifest is what it was before buckets existed
            del d["buckets"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{where} is not a TinyFlux cache manifest (format={d.get('format')!r})")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise CacheFormatError(
                f"{where} has format_version {d['format_version']}, newer than this TinyFlux reads ({FORMAT_VERSION}); "
                "upgrade tinyflux or rebuild the cache with this version"
            )
        d = dict(d)
        d["fields"] = {k: FieldSpec(**v) for k, v in d["fields"].items()}
        return cls(**d)


def tinyflux_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinyflux")
    except PackageNotFoundError:
        return "0.1.0+local"


def write_manifest(cache_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(cache_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path


def load_manifest(cache_dir: str | Path) -> Manifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = (
            "the build has not finished: run the same build_cache.py command again to complete it"
            if (Path(cache_dir) / SHARD_DIR).is_dir()
            else "build one with `python build_cache.py --images DIR --output CACHE_DIR`"
        )
        raise CacheFormatError(f"no {MANIFEST_NAME} in {cache_dir}: {hint}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{path} is not valid JSON ({e}); rebuild the manifest by re-running the build") from e
    return Manifest.from_dict(d, where=str(path))


def shard_paths(cache_dir: str | Path, manifest: Manifest) -> list[Path]:
    """Absolute shard paths in manifest order, each checked to exist."""
    paths = [Path(cache_dir) / s["name"] for s in manifest.shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CacheFormatError(
            f"{len(missing)} shard(s) listed in {cache_dir}/{MANIFEST_NAME} are missing: {missing[:3]}"
        )
    return paths


def assemble_manifest(cache_dir: str | Path, num_shards: int, name: str, settings: dict[str, Any]) -> Manifest:
    """The manifest of shards 0..num_shards-1, from their sidecars; raises when any is missing or stale."""
    want_hash = feature_hash(settings)
    sidecars = [read_sidecar(shard_path(cache_dir, j)) for j in range(num_shards)]
    incomplete = [j for j, s in enumerate(sidecars) if s is None or s.get("feature_hash") != want_hash]
    if incomplete:
        raise CacheFormatError(
            f"{len(incomplete)} of {num_shards} shards in {cache_dir} are not complete (first: {incomplete[:5]}); "
            "run the same build command again to finish them"
        )
    filled = [s for s in sidecars if s["count"]]
    if not filled:
        raise CacheFormatError(
            f"no input in {cache_dir} produced a sample; {REPORT_TEXT_NAME} lists why each was skipped"
        )
    fields = filled[0]["fields"]
    counts: dict[str, int] = {}
    for s in sidecars:
        for name, n in s.get("bucket_counts", {}).items():
            counts[name] = counts.get(name, 0) + n
    buckets = [{"height": h, "width": w, "count": counts.get(f"{h}x{w}", 0)} for h, w in settings.get("buckets", [])]
    for s in filled:
        if s["fields"] != fields:
            raise CacheFormatError(f"{s['name']} holds fields {s['fields']}, other shards {fields}: rebuild that shard")
    num_samples = sum(s["count"] for s in sidecars)
    return Manifest(
        name=name,
        num_samples=num_samples,
        shards=[{k: s[k] for k in ("name", "count", "bytes", "sha256", "bucket_of") if k in s} for s in sidecars],
        fields={k: FieldSpec(**v) for k, v in fields.items()},
        t_buckets=list(settings["t_buckets"]),
        resolution=settings["resolution"],
        t5_layers=list(settings["t5_layers"]),
        seed=settings["seed"],
        sources=dict(settings["sources"]),
        compute_dtype=settings["compute_dtype"],
        storage_dtype=settings["storage_dtype"],
        feature_hash=want_hash,
        num_inputs=sum(len(s["input_keys"]) for s in sidecars),
        num_skipped=sum(len(s["skipped"]) for s in sidecars),
        t5_length_mean=sum(s["t5_length_sum"] for s in sidecars) / num_samples,
        t5_length_max=max(s["t5_length_max"] for s in sidecars),
        settings=settings,
        text_regime=settings.get("text_regime", "masked"),
        sol_stats_names=list(settings.get("sol_stats_names", SOL_STATS)),
        tinyflux_version=tinyflux_version(),
        buckets=buckets,
    )


def skipped_inputs(shards: list[Path]) -> list[dict[str, str]]:
    """Every input the build skipped: {'key', 'reason', 'detail', 'source'}, in input order."""
    return [item for path in shards for item in read_sidecar(path)["skipped"]]


def write_report(cache_dir: str | Path, shards: list[Path]) -> None:
    """report.json and report.txt next to the manifest: how many inputs were used, and each skipped one with why.

    Read from the shards' sidecars alone, so it is written even when no input produced a sample (and no manifest).
    """
    sidecars = [read_sidecar(path) for path in shards]
    skipped = skipped_inputs(shards)
    num_inputs, num_samples = sum(len(s["input_keys"]) for s in sidecars), sum(s["count"] for s in sidecars)
    by_reason: dict[str, int] = {}
    for item in skipped:
        by_reason[item["reason"]] = by_reason.get(item["reason"], 0) + 1
    report = {
        "num_inputs": num_inputs,
        "num_samples": num_samples,
        "num_skipped": len(skipped),
        "by_reason": by_reason,
        "skipped": skipped,
    }
    write_json_atomic(Path(cache_dir) / REPORT_NAME, report)
    lines = [
        f"{num_inputs} inputs, {num_samples} cached, {len(skipped)} skipped",
        *(f"  {reason}: {n}" for reason, n in sorted(by_reason.items())),
        "",
        *(f"{item['reason']:<16} {item['key']}  {item['detail']}  ({item['source']})" for item in skipped),
    ]
    tmp = Path(cache_dir) / (REPORT_TEXT_NAME + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, Path(cache_dir) / REPORT_TEXT_NAME)


def _cache_expectations(manifest: Manifest) -> dict[str, Any]:
    """The model-config fields a cache pins down, by TinyFluxConfig field name."""
    c = manifest.latent_shape[0]
    _, k, d = manifest.fields["t5_embeds"].shape
    want: dict[str, Any] = {
        "in_channels": c,
        "t5_layers": tuple(manifest.t5_layers),
        "t5_hidden_size": d,
        "pooled_projection_dim": manifest.fields["clip_pooled"].shape[0],
        "_latent_hw": [(b["height"] // 8, b["width"] // 8) for b in manifest_buckets(manifest)],
    }
    assert k == len(manifest.t5_layers), "manifest t5 K disagrees with its t5_layers"
    if manifest.has_lune:
        want["lune_expert_dim"] = manifest.fields["lune"].shape[-1]
    if manifest.has_sol:
        want["sol_spatial_size"] = manifest.fields["sol_spatial"].shape[-1]
    return want


def _mismatches(manifest: Manifest, config: TinyFluxConfig) -> list[tuple[str, Any, Any]]:
    want = _cache_expectations(manifest)
    out = []
    for name, cache_value in want.items():
        if name == "_latent_hw":
            for h, w in cache_value:
                if h % config.patch_size or w % config.patch_size:
                    out.append(("patch_size", f"latents {h}x{w}", f"patch_size {config.patch_size} dividing them"))
            continue
        if name == "lune_expert_dim" and not config.use_lune_expert:
            continue
        if name == "sol_spatial_size" and not config.use_sol_prior:
            continue
        if getattr(config, name) != cache_value:
            out.append((name, cache_value, getattr(config, name)))
    return out + _regime_mismatches(manifest, config)


def _regime_mismatches(manifest: Manifest, config: TinyFluxConfig) -> list[tuple[str, Any, Any]]:
    """What the text regime and the Sol statistic columns demand: the same regime, and at least the columns the model
    reads (its first sol_num_stats of SOL_STATS). A converted original cache is padded and has 3 columns."""
    out: list[tuple[str, Any, Any]] = []
    if manifest.text_regime != config.text_regime:
        out.append(("text_regime", manifest.text_regime, config.text_regime))
    if manifest.latent_shift != config.latent_shift:
        out.append(("latent_shift", manifest.latent_shift, config.latent_shift))
    if config.use_sol_prior and manifest.has_sol:
        names, n = tuple(manifest.sol_stats_names), config.sol_num_stats
        if names[:n] != SOL_STATS[:n]:
            out.append(("sol_num_stats", names, n))
    return out


def _fix_for(name: str, cache_value: Any, model_value: Any) -> str:
    if name == "t5_layers":
        layers = " ".join(str(i) for i in model_value)
        return f"rebuild the cache with `--t5_layers {layers}` (or the --model_preset whose t5_layers these are)"
    if name == "patch_size":
        return "rebuild the cache at a --resolution whose latent side (resolution / 8) the patch size divides"
    if name == "text_regime" and cache_value == "padded":
        return "use a model with text_regime='padded' (the deep preset), or rebuild the cache from the images"
    if name == "text_regime":
        return (
            "rebuild the cache with --text_regime padded (all 128 T5 states), or use a model with text_regime='masked'"
        )
    if name == "latent_shift":
        return f"use a model with latent_shift={cache_value}, or rebuild the cache with --latent_shift {str(model_value).lower()}"
    if name == "sol_num_stats":
        return (
            f"use a model with sol_num_stats={len(cache_value)} or fewer (it reads the first columns), or rebuild the "
            f"cache with build_cache.py, which computes all {len(SOL_STATS)} ({', '.join(SOL_STATS)})"
        )
    return "rebuild the cache with encoders / experts of that width (--zoo or the per-model source flags)"


def check_compatible(manifest: Manifest, config: TinyFluxConfig, where: str = "the cache") -> None:
    """Raise CacheMismatchError naming each field where the cache does not fit `config`, and how to fix it.

    A cache without Lune / Sol features fits any config (the predictors then train without teacher targets).
    """
    problems = _mismatches(manifest, config)
    if not problems:
        return
    lines = [
        f"- {name}: {where} has {cache_value}, the model expects {model_value}; {_fix_for(name, cache_value, model_value)}"
        for name, cache_value, model_value in problems
    ]
    fitting = [p for p in PRESETS if not _mismatches(manifest, TinyFluxConfig.preset(p))]
    choice = (
        f"Or train a model preset built for this cache: {', '.join(fitting)}."
        if fitting
        else "No model preset fits this cache; set the fields above in the model config to the cache's values."
    )
    raise CacheMismatchError(
        f"{where} (feature_hash {manifest.feature_hash}) does not fit the model config:\n"
        + "\n".join(lines)
        + "\n"
        + choice
    )
