"""Zoo-facing encoding for the cache: image loading and preparation, text features, teacher features at buckets.

Images become RGB, shorter side resized to the resolution, centre-cropped square (prepare_image); anything that cannot
be used raises SkippedInput with a reason code the build report lists. Teacher features are computed at every timestep
bucket with one global seed, so a sample's features depend on (prompt, t, seed) only, never on its batch or rank
(up to float rounding). The teachers' CLIP context is computed once per batch (teacher_context) and reused for every
bucket of both teachers instead of once per teacher call.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

from tinyflux.cache.buckets import Bucket, nearest_bucket
from tinyflux.cache.format import T_BUCKETS
from tinyflux.model.config import SOL_SPATIAL_SIZE

if TYPE_CHECKING:
    from tinyflux.frozen.zoo import ModelZoo

# Reason codes of skipped inputs, as report.json lists them.
CORRUPT_IMAGE = "corrupt_image"  # cannot be opened or decoded (also truncated files)
MISSING_IMAGE = "missing_image"  # a dataset row without an image
MISSING_CAPTION = "missing_caption"  # no same-stem .txt, or no caption in the row / sample
EMPTY_CAPTION = "empty_caption"  # caption is empty or whitespace only
TOO_SMALL = "too_small"  # shorter side below resolution / 2
DUPLICATE_KEY = "duplicate_key"  # a second input with the same sample key (e.g. a.png and a.jpg)
BAD_CAPTION_ENCODING = "bad_caption_encoding"  # caption bytes that are not UTF-8 (never replaced with U+FFFD)
UNSUPPORTED_MODE = "unsupported_mode"  # an image mode PIL cannot convert to RGB (LAB, multi-band TIFF, ...)
OUTSIDE_IMAGES = "outside_images"  # an image or caption that resolves (symlink) outside --images

BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
_16_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


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
        try:
            caption = caption.decode("utf-8-sig")  # UTF-8; a leading byte-order mark is dropped
        except UnicodeDecodeError as e:
            raise SkippedInput(
                BAD_CAPTION_ENCODING, f"caption is not UTF-8 (byte {e.start}: {caption[e.start : e.start + 4]!r})"
            ) from e
    caption = str(caption).strip()
    if not caption:
        raise SkippedInput(EMPTY_CAPTION, "caption is empty")
    return caption


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB by a stated rule per mode (docs/CACHE_FORMAT.md, "Image modes"); SkippedInput when none applies.

    16-bit grayscale (I;16*) and 32-bit integer (I) are read as 0..65535 and scaled by 255 / 65535; float (F) as
    0..1, clipped; alpha (RGBA, LA, PA, RGBa, La, P with transparency) is composited onto BACKGROUND; CMYK, palette,
    1-bit, YCbCr and the rest go through PIL's own conversion (CMYK without its ICC profile).
    """
    if image.mode in (*_16_BIT, "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" else 65535.0  # PIL's convert("L") would clip at 255: almost white
        gray = (np.clip(pixels / scale, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")  # (H, W) uint8: mode L
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return image.convert("RGB")
    except ValueError as e:  # e.g. LAB: PIL has no direct conversion
        raise SkippedInput(UNSUPPORTED_MODE, f"image mode {image.mode} cannot be converted to RGB ({e})") from e


def prepare_image(image: Image.Image, resolution: int, min_side: int | None = None) -> Image.Image:
    """EXIF orientation applied, 8-bit RGB (to_rgb8), shorter side resized to `resolution` (Lanczos), centre-cropped
    to resolution x resolution.

    Raises SkippedInput(TOO_SMALL) when the shorter side is below `min_side` (default resolution // 2): upscaling
    further would cache mostly interpolation blur.
    """
    min_side = resolution // 2 if min_side is None else min_side
    w, h = image.size
    if min(w, h) < min_side:
        raise SkippedInput(TOO_SMALL, f"{w}x{h}: shorter side < {min_side} (resolution {resolution} / 2)")
    image = to_rgb8(ImageOps.exif_transpose(image))  # phone photos are stored sideways with orientation 6 or 8
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def prepare_bucket_image(
    image: Image.Image, buckets: Sequence[Bucket], resolution: int, min_side: int | None = None
) -> tuple[Image.Image, Bucket]:
    """(image, its bucket): as prepare_image, but resized (Lanczos) to cover the bucket of nearest aspect ratio
    (tinyflux.cache.buckets) and centre-cropped by what the rounding leaves over. TOO_SMALL as prepare_image."""
    min_side = resolution // 2 if min_side is None else min_side
    w, h = image.size
    if min(w, h) < min_side:
        raise SkippedInput(TOO_SMALL, f"{w}x{h}: shorter side < {min_side} (resolution {resolution} / 2)")
    image = to_rgb8(ImageOps.exif_transpose(image))
    w, h = image.size
    bucket = nearest_bucket(w, h, buckets)
    scale = max(bucket.width / w, bucket.height / h)
    size = (max(bucket.width, round(w * scale)), max(bucket.height, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - bucket.width) // 2, (size[1] - bucket.height) // 2
    return image.crop((left, top, left + bucket.width, top + bucket.height)), bucket


def text_features(
    zoo: ModelZoo, prompts: Sequence[str], batch_size: int = 128, text_regime: str = "masked"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t5 (N, L, K, D) zero past each length, lengths (N,) long, clip_pooled (N, P)), float32 on the CPU.

    text_regime "padded": all 128 states, T5's pad outputs included, every length 128 (what released weights read).
    """
    padded = text_regime == "padded"
    t5, pooled, lengths = zoo.encode_prompts_batched(
        list(prompts), batch_size=batch_size, return_lengths=True, padded=padded
    )
    return t5, lengths, pooled


def teacher_context(zoo: ModelZoo, prompts: Sequence[str]) -> torch.Tensor:
    """The teachers' CLIP context of each prompt, (N, 77, D) float32 on the CPU: one CLIP pass that every bucket of
    both teachers reuses (a teacher's input is (prompt, t, seed) and the context depends on the prompt alone)."""
    return zoo.encode_clip_context(prompts)


def _every_bucket(context: torch.Tensor, t_buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's context at each bucket, bucket-major: rows (T * N, 77, D) and their timesteps (T * N,)."""
    return context.repeat(len(t_buckets), 1, 1), t_buckets.repeat_interleave(context.shape[0])


def lune_features(
    zoo: ModelZoo,
    prompts: Sequence[str],
    t_buckets: torch.Tensor = T_BUCKETS,
    seed: int = 0,
    batch_size: int = 64,
    batch_timesteps: bool = False,
    *,
    context: torch.Tensor | None = None,
    teacher_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Lune teacher features of every prompt at every bucket: (N, T, lune_dim) float32, as ModelZoo.extract_lune
    defines them. `context` (N, 77, D): the prompts' teacher_context when the caller has it already; `teacher_grid`
    (h, w): the noise grid of an aspect bucket (Bucket.teacher_grid), else the teacher's square.

    batch_timesteps=True runs all T buckets of a prompt batch in one teacher call (T times the activations).
    """

    context = teacher_context(zoo, prompts) if context is None else context
    t_buckets, num_t = t_buckets.float(), len(t_buckets)
    if batch_timesteps:
        rows, t = _every_bucket(context, t_buckets)
        out = zoo.lune_of_context(rows, t, seed, batch_size * num_t, teacher_grid)
        return rearrange(out, "(t n) d -> n t d", t=num_t)
    per_t = [zoo.lune_of_context(context, t, seed, batch_size, teacher_grid) for t in t_buckets]
    return torch.stack(per_t, dim=1)  # (N, T, D)


def sol_features(
    zoo: ModelZoo,
    prompts: Sequence[str],
    t_buckets: torch.Tensor = T_BUCKETS,
    seed: int = 0,
    batch_size: int = 64,
    batch_timesteps: bool = True,
    spatial_size: int = SOL_SPATIAL_SIZE,
    *,
    context: torch.Tensor | None = None,
    teacher_grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sol teacher features at every bucket, as ModelZoo.extract_sol defines them: stats (N, T, 4) and spatial
    (N, T, S, S), float32, S x S for every teacher_grid. `context` and `teacher_grid` as for lune_features."""

    context = teacher_context(zoo, prompts) if context is None else context
    t_buckets, num_t = t_buckets.float(), len(t_buckets)
    if batch_timesteps:
        rows, t = _every_bucket(context, t_buckets)
        stats, spatial = zoo.sol_of_context(rows, t, seed, batch_size * num_t, spatial_size, teacher_grid)
        stats = rearrange(stats, "(t n) c -> n t c", t=num_t)
        return stats, rearrange(spatial, "(t n) h w -> n t h w", t=num_t)
    per_t = [zoo.sol_of_context(context, t, seed, batch_size, spatial_size, teacher_grid) for t in t_buckets]
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
    spatial_size: int = SOL_SPATIAL_SIZE,
    text_regime: str = "masked",
    latent_shift: bool = True,
    teacher_grid: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Everything a cache stores for a batch of prepared images and captions, float32 on the CPU, one batch per model:
    latents (B, C, H, W), t5_embeds (B, L, K, D), t5_lengths (B,), clip_pooled (B, P), and when asked
    lune (B, T, lune_dim), sol_stats (B, T, 4), sol_spatial (B, T, S, S).

    The teachers' CLIP context is computed once and serves all T buckets of both; each teacher runs its T buckets as
    one call of T * B rows. Images of an aspect bucket come with the bucket's `teacher_grid` (Bucket.teacher_grid)."""
    n = len(images)
    out = {"latents": zoo.encode_images_batched(list(images), batch_size=n, shift=latent_shift)}
    out["t5_embeds"], out["t5_lengths"], out["clip_pooled"] = text_features(zoo, captions, n, text_regime)
    context = teacher_context(zoo, captions) if lune or sol else None
    if lune:
        out["lune"] = lune_features(
            zoo, captions, t_buckets, seed, n, batch_timesteps=True, context=context, teacher_grid=teacher_grid
        )
    if sol:
        out["sol_stats"], out["sol_spatial"] = sol_features(
            zoo, captions, t_buckets, seed, n, batch_timesteps=True, spatial_size=spatial_size, context=context,
            teacher_grid=teacher_grid,
        )  # fmt: skip
    return out
