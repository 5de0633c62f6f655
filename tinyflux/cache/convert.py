"""Convert the original TinyFlux's cache directories into the shard format: `python -m tinyflux.cache.convert`.

The original (AbstractEyes/tiny-flux, v4.2) saved a cache as `torch.save` dicts, in one of two layouts:

- single: `encodings.pt` {latents (N, 16, H, W), t5_embeds (N, 128, 768), clip_pooled (N, 768), prompts, dtype},
  `lune.pt` {features (N, T, 1280), t_buckets (T,), dtype}, `sol.pt` {stats (N, T, 3), spatial (N, T, 8, 8), t_buckets,
  dtype} and `meta.pt` {name}; lune.pt / sol.pt only when those teachers were extracted;
- incremental: `state.json` {name, n_samples, shard_size, build_lune, build_sol, completed_shards} and
  `encodings/shard_NNNN.pt`, `lune/shard_NNNN.pt`, `sol/shard_NNNN.pt`, each part file shaped like the single file.

Every file is read with `torch.load(weights_only=True)`: tensors, strings, lists and dtypes load, any other pickled
object is refused. What maps to what, and what the original's numbers mean, is in docs/CACHE_FORMAT.md ("Converting
the original's caches").
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyflux.cache.format import (
    T_BUCKETS,
    CacheFormatError,
    Manifest,
    assemble_manifest,
    feature_hash,
    feature_settings,
    shard_path,
    shard_paths,
    write_cache_shard,
    write_manifest,
    write_report,
)
from tinyflux.frozen.sources import VAE_DOWNSAMPLE
from tinyflux.util.dtypes import dtype_name

# The original computed these three, in this order (its zoo.sol_forward); "clustering" there is 1 - entropy.
ORIGINAL_SOL_STATS = ("locality", "entropy", "clustering")
ORIGINAL_T5_LAYER = 12  # flan-t5-base's last_hidden_state: hidden_states[12], the final normed output
# The original's model sources (its ModelZoo defaults); its cache files do not record them.
ORIGINAL_SOURCES = {
    "vae": "black-forest-labs/FLUX.1-schnell (vae)",
    "t5": "google/flan-t5-base",
    "clip": "openai/clip-vit-large-patch14",
    "experts": "AbstractPhil/tinyflux-experts",
}
PAIRINGS = ("ours", "original")
_BUCKET_SNAP = 1e-6  # flipped buckets this close to T_BUCKETS are T_BUCKETS (float32 rounding of 1 - t)


@dataclass
class OriginalPart:
    """One original cache file set: the single layout's files, or one shard of the incremental layout."""

    name: str  # "." or "shard_0003", for messages
    encodings: dict[str, Any]
    lune: dict[str, Any] | None
    sol: dict[str, Any] | None

    def __len__(self) -> int:
        return int(self.encodings["latents"].shape[0])


def load_original_file(path: Path, required: Sequence[str]) -> dict[str, Any]:
    """A torch.save dict of the original, read with weights_only=True; CacheFormatError when it is unsafe or broken."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a {found.group(1)} object" if found else "a pickled object"
        raise CacheFormatError(
            f"{path} holds {what}, which weights_only loading refuses (only tensors, str, lists, dicts and dtypes "
            "load); it was not written by the original's cache code, and it is not unpickled here"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise CacheFormatError(f"{path} is truncated or corrupt: torch.load cannot read it ({reason})") from e
    if not isinstance(data, dict):
        raise CacheFormatError(f"{path} holds a {type(data).__name__}, not the dict the original's cache code saves")
    missing = [k for k in required if not isinstance(data.get(k), torch.Tensor)]
    if missing:
        raise CacheFormatError(f"{path} lacks the tensors {missing} (it has keys {sorted(data)})")
    return data


def _load_part(name: str, enc: Path, lune: Path | None, sol: Path | None) -> OriginalPart:
    part = OriginalPart(
        name,
        load_original_file(enc, ("latents", "t5_embeds", "clip_pooled")),
        load_original_file(lune, ("features", "t_buckets")) if lune is not None else None,
        load_original_file(sol, ("stats", "spatial", "t_buckets")) if sol is not None else None,
    )
    _check_part(part, enc)
    return part


def _check_part(part: OriginalPart, where: Path) -> None:
    e, n = part.encodings, len(part)
    shapes = {
        "latents": (e["latents"].ndim == 4, "(N, C, H, W)"),
        "t5_embeds": (e["t5_embeds"].ndim == 3, "(N, 128, D)"),
        "clip_pooled": (e["clip_pooled"].ndim == 2, "(N, P)"),
    }
    if part.lune is not None:
        t = len(part.lune["t_buckets"])
        shapes["lune features"] = (part.lune["features"].ndim == 3 and part.lune["features"].shape[1] == t, "(N, T, F)")
    if part.sol is not None:
        t, stats, spatial = len(part.sol["t_buckets"]), part.sol["stats"], part.sol["spatial"]
        shapes["sol stats"] = (stats.ndim == 3 and stats.shape[1:] == (t, len(ORIGINAL_SOL_STATS)), "(N, T, 3)")
        shapes["sol spatial"] = (
            spatial.ndim == 4 and spatial.shape[1] == t and spatial.shape[2] == spatial.shape[3],
            "(N, T, S, S)",
        )
    bad = [f"{k} should be {want} (T = len(t_buckets))" for k, (ok, want) in shapes.items() if not ok]
    counts = [e["t5_embeds"].shape[0], e["clip_pooled"].shape[0]]
    counts += [part.lune["features"].shape[0]] if part.lune is not None else []
    counts += [part.sol["stats"].shape[0], part.sol["spatial"].shape[0]] if part.sol is not None else []
    prompts = e.get("prompts")
    if prompts is not None and not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        bad.append("prompts should be a list of str")
    elif prompts is not None:
        counts.append(len(prompts))
    if any(c != n for c in counts):
        bad.append(f"sample counts disagree: latents {n}, the others {counts}")
    if bad:
        raise CacheFormatError(f"{where.parent} ({part.name}): " + "; ".join(bad))


def read_original(src: str | Path, partial: bool = False) -> tuple[str, str, Iterator[OriginalPart], int]:
    """(layout, name, parts, num_samples) of an original cache directory; parts load lazily, one at a time."""
    src = Path(src)
    if (src / "state.json").is_file():
        return _read_incremental(src, partial)
    if (src / "encodings.pt").is_file():
        meta = load_original_file(src / "meta.pt", ()) if (src / "meta.pt").is_file() else {}
        part = _load_part(".", src / "encodings.pt", _opt(src / "lune.pt"), _opt(src / "sol.pt"))
        return "single", str(meta.get("name") or src.name), iter([part]), len(part)
    raise CacheFormatError(
        f"{src} is not an original TinyFlux cache: it has neither encodings.pt (single layout) nor state.json "
        "(incremental layout)"
    )


def _opt(path: Path) -> Path | None:
    return path if path.is_file() else None


def _read_incremental(src: Path, partial: bool) -> tuple[str, str, Iterator[OriginalPart], int]:
    try:
        state = json.loads((src / "state.json").read_text())
        n_samples, shard_size = int(state["n_samples"]), int(state["shard_size"])
        done = sorted(int(j) for j in state.get("completed_shards", []))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CacheFormatError(f"{src}/state.json is not the original's build state ({e!r})") from e
    n_shards = -(-n_samples // shard_size)
    missing = sorted(set(range(n_shards)) - set(done))
    if missing and not partial:
        raise CacheFormatError(
            f"{src}: the original build completed {len(done)} of {n_shards} shards (missing {missing[:5]}); finish it "
            "with the original's build_incremental, or pass --partial to convert the completed shards only"
        )
    if not done:
        raise CacheFormatError(f"{src}: the original build completed no shard; nothing to convert")
    names = [f"shard_{j:04d}" for j in done]
    teachers = {t: bool(state.get(f"build_{t}", False)) for t in ("lune", "sol")}

    def path(kind: str, name: str) -> Path:
        p = src / kind / f"{name}.pt"
        if not p.is_file():
            raise CacheFormatError(f"{p} is missing although state.json lists {name} as complete")
        return p

    for name in names:  # every file must exist before anything is written
        for kind in ("encodings", *(t for t, on in teachers.items() if on)):
            path(kind, name)
    sizes = [min(shard_size, n_samples - j * shard_size) for j in done]

    def parts() -> Iterator[OriginalPart]:
        for name, size in zip(names, sizes, strict=True):
            lune = path("lune", name) if teachers["lune"] else None
            part = _load_part(name, path("encodings", name), lune, path("sol", name) if teachers["sol"] else None)
            if len(part) != size:
                raise CacheFormatError(
                    f"{src}/encodings/{name}.pt holds {len(part)} samples, state.json implies {size}"
                )
            yield part

    return "incremental", str(state.get("name") or src.name), parts(), sum(sizes)


def converted_buckets(t_buckets: torch.Tensor, pairing: str) -> tuple[torch.Tensor, bool]:
    """(our t_buckets, flip?) for the original's buckets. The original gave the teachers t * 1000, and they read 1000
    as pure noise, so its bucket t_b holds the teacher at our t = 1 - t_b: `ours` flips the bucket axis to say so;
    `original` keeps the pairing the released weights were trained with (student t <-> teacher level t * 1000)."""
    t = t_buckets.detach().double().cpu()
    if t.ndim != 1 or len(t) < 2 or not bool((t[1:] > t[:-1]).all()) or t.min() < 0 or t.max() > 1:
        raise CacheFormatError(f"t_buckets {t.tolist()} are not ascending values in [0, 1]")
    flip = pairing == "ours"
    ours = (1 - t).flip(0) if flip else t
    if len(ours) == len(T_BUCKETS) and bool(((ours - T_BUCKETS.double()).abs() < _BUCKET_SNAP).all()):
        return T_BUCKETS.clone(), flip
    return ours.float(), flip


def _samples(parts: Iterator[OriginalPart], flip: bool, t_buckets: torch.Tensor) -> Iterator[tuple[str, str, dict]]:
    """(key, caption, tensors) per sample, in the original's order; keys are the zero-padded sample index."""
    i = 0
    for part in parts:
        for teacher in (part.lune, part.sol):
            if teacher is not None and not torch.equal(teacher["t_buckets"].float().cpu(), t_buckets):
                raise CacheFormatError(
                    f"{part.name}: t_buckets {teacher['t_buckets'].tolist()} differ from the first part's "
                    f"{t_buckets.tolist()}"
                )
        e, prompts = part.encodings, part.encodings.get("prompts")
        for b in range(len(part)):
            tensors = {
                "latents": e["latents"][b],
                "t5_embeds": e["t5_embeds"][b].unsqueeze(1),  # (L, D) -> (L, K=1, D): the last hidden state only
                "clip_pooled": e["clip_pooled"][b],
            }
            if part.lune is not None:
                lune = part.lune["features"][b]  # (T, F)
                tensors["lune"] = lune.flip(0) if flip else lune
            if part.sol is not None:
                stats, spatial = part.sol["stats"][b], part.sol["spatial"][b]  # (T, 3), (T, S, S)
                tensors["sol_stats"] = stats.flip(0) if flip else stats
                tensors["sol_spatial"] = spatial.flip(0) if flip else spatial
            yield f"{i:08d}", prompts[b] if prompts is not None else "", tensors
            i += 1


def convert_original_cache(
    src: str | Path,
    output: str | Path,
    name: str | None = None,
    shard_size: int = 1000,
    pairing: str = "ours",
    partial: bool = False,
) -> Manifest:
    """Convert an original TinyFlux cache directory (either layout) into a shard cache at `output`; returns its manifest.

    Tensors keep their stored dtype and values; only the teacher bucket axis is reversed (pairing "ours"), and the T5
    states gain the layer axis. The manifest records text_regime "padded", the 3 Sol columns the original computed,
    and in `settings` how the latents, teachers and statistics were made.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing {pairing!r} must be one of {PAIRINGS}")
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be at least 1")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise CacheFormatError(f"{output} is not empty; convert into a new directory")
    layout, original_name, parts, num = read_original(src, partial)
    first = next(parts)
    teacher = first.lune or first.sol
    t_buckets, flip = converted_buckets(teacher["t_buckets"], pairing) if teacher is not None else (T_BUCKETS, False)
    settings = _settings(first, layout, pairing, t_buckets)
    fhash = feature_hash(settings)

    def chained() -> Iterator[OriginalPart]:
        yield first
        yield from parts

    stream = _samples(chained(), flip, teacher["t_buckets"].float().cpu() if teacher is not None else t_buckets)
    num_shards = max(1, -(-num // shard_size))
    for j in range(num_shards):
        samples = [
            (key, caption, tensors, {"input_index": int(key), "t5_length": tensors["t5_embeds"].shape[0]})
            for key, caption, tensors in _take(stream, shard_size)
        ]
        write_cache_shard(shard_path(output, j), samples, [key for key, *_ in samples], fhash)
    manifest = assemble_manifest(output, num_shards, name or original_name, settings)
    write_manifest(output, manifest)
    write_report(output, shard_paths(output, manifest))
    return manifest


def _take(stream: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        item = next(stream, None)
        if item is None:
            return
        yield item


def _settings(first: OriginalPart, layout: str, pairing: str, t_buckets: torch.Tensor) -> dict[str, Any]:
    latents = first.encodings["latents"]
    settings = feature_settings(
        resolution=latents.shape[-1] * VAE_DOWNSAMPLE,
        t5_layers=[ORIGINAL_T5_LAYER],
        seed=-1,  # the original seeded each batch (42 + first index * 1000 + bucket); no per-sample seed exists
        sources=ORIGINAL_SOURCES,
        compute_dtype="VAE bfloat16; T5, CLIP and teachers float16 (the original's defaults)",
        storage_dtype=dtype_name(latents.dtype),
        lune=first.lune is not None,
        sol=first.sol is not None,
        t_buckets=t_buckets,
        text_regime="padded",
    )
    teacher_level = "(1 - t) * 1000" if pairing == "ours" else "t * 1000 (the original's pairing)"
    settings.update(
        converted_from=f"original TinyFlux cache, {layout} layout",
        resize="the original's: squashed to 512 x 512 (Lanczos), no crop",
        latent_convention="sample(VAE.encode(x)) * scaling_factor, shift_factor not subtracted",
        teacher_timestep=teacher_level,
        sol_stats_names=list(ORIGINAL_SOL_STATS),
        sol_definitions="the original's: clustering = 1 - entropy; spatial map bilinear-resized, layers summed",
    )
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tinyflux.cache.convert",
        description="Convert an original TinyFlux cache directory (encodings.pt / lune.pt / sol.pt / meta.pt, or the "
        "incremental state.json + shard folders) into a TinyFlux shard cache (docs/CACHE_FORMAT.md).",
    )
    parser.add_argument("original_dir", help="the original's cache directory")
    parser.add_argument("output_dir", help="the new shard cache (must not exist or be empty)")
    parser.add_argument("--name", default=None, help="dataset name in the manifest (default: the original's name)")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    parser.add_argument(
        "--pairing",
        choices=PAIRINGS,
        default="ours",
        help="ours: reverse the teacher buckets so bucket t holds the teacher at noise level (1 - t) * 1000, as our "
        "builds do; original: keep the original's pairing (what the released weights were trained with)",
    )
    parser.add_argument("--partial", action="store_true", help="convert the completed shards of an unfinished build")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        m = convert_original_cache(
            args.original_dir, args.output_dir, args.name, args.shard_size, args.pairing, args.partial
        )
    except CacheFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{m.num_samples} samples in {len(m.shards)} shards -> {args.output_dir} (text_regime {m.text_regime})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
