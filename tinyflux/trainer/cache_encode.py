"""Zoo-facing encoding for the cache: image loading and preparation, text features, teacher features at buckets.

Images become RGB, shorter side resized to the resolution, centre-cropped square (prepare_image); anything that cannot
be used raises SkippedInput with a reason code the build report lists. Teacher features are computed at every timestep
bucket with one global seed, so a sample's features depend on (prompt, t, seed) only, never on its batch or rank.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from PIL import Image

from tinyflux.trainer.cache_format import T_BUCKETS

if TYPE_CHECKING:
    from tinyflux.model.zoo import ModelZoo

# Reason codes of skipped inputs, as report.json lists them.
CORRUPT_IMAGE = "corrupt_image"  # cannot be opened or decoded (also truncated files)
MISSING_IMAGE = "missing_image"  # a dataset row without an image
MISSING_CAPTION = "missing_caption"  # no same-stem .txt, or no caption in the row / sample
EMPTY_CAPTION = "empty_caption"  # caption is empty or whitespace only
TOO_SMALL = "too_small"  # shorter side below resolution / 2
DUPLICATE_KEY = "duplicate_key"  # a second input with the same sample key (e.g. a.png and a.jpg)


class SkippedInput(Exception):
    """An input the cache builder leaves out: `reason` is one of the reason codes above, `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_image(source: bytes | str | Path) -> Image.Image:
    """Open and fully decode an image from bytes or a path; SkippedInput(CORRUPT_IMAGE) when that fails."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()  # decode now: a truncated or corrupt file fails here, not later inside a batch
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise SkippedInput(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from e
    return image


def check_caption(caption: str | bytes | None) -> str:
    """The stripped caption; SkippedInput when it is missing or empty."""
    if caption is None:
        raise SkippedInput(MISSING_CAPTION, "no caption")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    caption = str(caption).strip()
    if not caption:
        raise SkippedInput(EMPTY_CAPTION, "caption is empty")
    return caption


def prepare_image(image: Image.Image, resolution: int, min_side: int | None = None) -> Image.Image:
    """RGB, shorter side resized to `resolution` (Lanczos), centre-cropped to resolution x resolution.

    Raises SkippedInput(TOO_SMALL) when the shorter side is below `min_side` (default resolution // 2): upscaling
    further would cache mostly interpolation blur. Transparent pixels become white.
    """
    min_side = resolution // 2 if min_side is None else min_side
    w, h = image.size
    if min(w, h) < min_side:
        raise SkippedInput(TOO_SMALL, f"{w}x{h}: shorter side < {min_side} (resolution {resolution} / 2)")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    image = image.convert("RGB")
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def text_features(
    zoo: ModelZoo, prompts: Sequence[str], batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t5 (N, L, K, D) zero past each length, lengths (N,) long, clip_pooled (N, P)), float32 on the CPU."""
    t5, pooled, lengths = zoo.encode_prompts_batched(list(prompts), batch_size=batch_size, return_lengths=True)
    return t5, lengths, pooled


def _every_bucket(prompts: list[str], t_buckets: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Each prompt at each bucket, bucket-major: rows (T * N) and their timesteps (T * N,), for one teacher call."""
    return [p for _ in t_buckets for p in prompts], t_buckets.repeat_interleave(len(prompts))


def lune_features(
    zoo: ModelZoo,
    prompts: Sequence[str],
    t_buckets: torch.Tensor = T_BUCKETS,
    seed: int = 0,
    batch_size: int = 64,
    batch_timesteps: bool = False,
) -> torch.Tensor:
    """Lune teacher features of every prompt at every bucket: (N, T, lune_dim) float32.

    batch_timesteps=True runs all T buckets of a prompt batch in one teacher call (T times the activations).
    """
    prompts, t_buckets = list(prompts), t_buckets.float()
    if batch_timesteps:
        rows, t = _every_bucket(prompts, t_buckets)
        out = zoo.extract_lune(rows, t, seed=seed, batch_size=batch_size * len(t_buckets))  # (T * N, D)
        return rearrange(out, "(t n) d -> n t d", t=len(t_buckets))
    per_t = [zoo.extract_lune(prompts, float(t), seed=seed, batch_size=batch_size) for t in t_buckets]
    return torch.stack(per_t, dim=1)  # (N, T, D)


def sol_features(
    zoo: ModelZoo,
    prompts: Sequence[str],
    t_buckets: torch.Tensor = T_BUCKETS,
    seed: int = 0,
    batch_size: int = 64,
    batch_timesteps: bool = True,
    spatial_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sol teacher features at every bucket: stats (N, T, 4) and spatial (N, T, S, S), float32."""
    prompts, t_buckets = list(prompts), t_buckets.float()
    num_t = len(t_buckets)
    if batch_timesteps:
        rows, t = _every_bucket(prompts, t_buckets)
        stats, spatial = zoo.extract_sol(rows, t, seed=seed, batch_size=batch_size * num_t, spatial_size=spatial_size)
        stats = rearrange(stats, "(t n) c -> n t c", t=num_t)
        return stats, rearrange(spatial, "(t n) h w -> n t h w", t=num_t)
    per_t = [
        zoo.extract_sol(prompts, float(t), seed=seed, batch_size=batch_size, spatial_size=spatial_size)
        for t in t_buckets
    ]
    return torch.stack([s for s, _ in per_t], dim=1), torch.stack([m for _, m in per_t], dim=1)


def encode_batch(
    zoo: ModelZoo,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    lune: bool = True,
    sol: bool = True,
    seed: int = 0,
    t_buckets: torch.Tensor = T_BUCKETS,
    spatial_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Everything a cache stores for a batch of prepared images and captions, float32 on the CPU, one batch per model:
    latents (B, C, H, W), t5_embeds (B, L, K, D), t5_lengths (B,), clip_pooled (B, P), and when asked
    lune (B, T, lune_dim), sol_stats (B, T, 4), sol_spatial (B, T, S, S)."""
    n = len(images)
    out = {"latents": zoo.encode_images_batched(list(images), batch_size=n)}
    out["t5_embeds"], out["t5_lengths"], out["clip_pooled"] = text_features(zoo, captions, batch_size=n)
    if lune:
        out["lune"] = lune_features(zoo, captions, t_buckets, seed, batch_size=n)
    if sol:
        out["sol_stats"], out["sol_spatial"] = sol_features(
            zoo, captions, t_buckets, seed, batch_size=n, spatial_size=spatial_size
        )
    return out
