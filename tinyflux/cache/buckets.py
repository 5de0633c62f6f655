"""Aspect-ratio buckets: which shapes a cache holds and which bucket each image goes to (docs/CACHE_FORMAT.md).

A bucket is an image size (height, width) in pixels, both multiples of BUCKET_MULTIPLE so the latent grid
(size / 8) divides into 2x2 patches. `--buckets auto` lists, for a resolution R, every landscape width from R upward
in BUCKET_MULTIPLE steps with the height that keeps the area near R * R (rounded to BUCKET_MULTIPLE), while the
ratio stays within MAX_ASPECT, and each one's portrait mirror. An image goes to the bucket of nearest log aspect
ratio, is resized to cover it and centre-cropped by what the rounding leaves over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tinyflux.errors import TinyFluxError
from tinyflux.frozen.sources import VAE_DOWNSAMPLE

# Sides in multiples of VAE 8 x a 2x2 patch (Flux's packing): every bucket fits any patch size up to 2 (the presets
# use 1) and a latent grid of even sides, as diffusers' and kohya's buckets are.
PATCH = 2
BUCKET_MULTIPLE = VAE_DOWNSAMPLE * PATCH  # 16 px
MAX_ASPECT = 2.0  # auto buckets range from 1:2 to 2:1


class BucketError(TinyFluxError, ValueError):
    """A bucket list that cannot be used, or a cache whose buckets this loader cannot train on."""


@dataclass(frozen=True, order=True)
class Bucket:
    """One image size of a cache, in pixels."""

    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // VAE_DOWNSAMPLE, self.width // VAE_DOWNSAMPLE

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)

    def teacher_grid(self, resolution: int, teacher_side: int) -> tuple[int, int]:
        """The teachers' noise grid for this bucket: its latent grid scaled by teacher_side / (resolution / 8), so
        the square bucket gets the teacher's own square (what square caches use) and every bucket its aspect at
        about the teacher's area. At --resolution 512 with SD1.5 (sample_size 64) that is the bucket's latent grid."""
        scale = teacher_side * VAE_DOWNSAMPLE / resolution
        h, w = self.latent_hw
        return max(2, round(h * scale)), max(2, round(w * scale))


def auto_buckets(resolution: int) -> list[Bucket]:
    """The `--buckets auto` list at `resolution` (module docstring), sorted by aspect ratio, portrait first."""
    if resolution % BUCKET_MULTIPLE:
        raise BucketError(
            f"--buckets auto needs a --resolution that is a multiple of {BUCKET_MULTIPLE} (got {resolution}): "
            "its square bucket is resolution x resolution"
        )
    area, out = resolution * resolution, set()
    width = resolution
    while True:
        height = max(BUCKET_MULTIPLE, round(area / width / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
        if width / height > MAX_ASPECT:
            break
        out |= {Bucket(height, width), Bucket(width, height)}
        width += BUCKET_MULTIPLE
    return sorted(out, key=lambda b: (b.log_aspect, b.height))


def parse_buckets(spec: str, resolution: int) -> list[Bucket]:
    """`auto` or "h,w;h,w;..." -> buckets; BucketError naming the first bad entry."""
    if spec.strip() == "auto":
        return auto_buckets(resolution)
    out = []
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        try:
            h, w = (int(v) for v in entry.split(","))
        except ValueError:
            raise BucketError(f"--buckets entry {entry!r} is not 'height,width' in pixels (e.g. '512,768')") from None
        if h <= 0 or w <= 0 or h % BUCKET_MULTIPLE or w % BUCKET_MULTIPLE:
            raise BucketError(
                f"--buckets entry {entry!r}: both sides must be positive multiples of {BUCKET_MULTIPLE} px "
                f"(VAE {VAE_DOWNSAMPLE} x patch {PATCH}); e.g. {_nearest_multiple(h)},{_nearest_multiple(w)}"
            )
        out.append(Bucket(h, w))
    if not out:
        raise BucketError(f"--buckets {spec!r} lists no bucket: give 'auto' or 'height,width;height,width'")
    if len(set(out)) != len(out):
        raise BucketError(f"--buckets {spec!r} lists a bucket twice")
    return sorted(out, key=lambda b: (b.log_aspect, b.height))


def _nearest_multiple(side: int) -> int:
    return max(BUCKET_MULTIPLE, round(side / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's in log ratio (the first of equals in list order)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(b.log_aspect - target))


def aspect_size(aspect: str, height: int, width: int, multiple: int) -> tuple[int, int]:
    """(height, width) in pixels of the aspect "W:H" (e.g. "3:2" landscape, "9:16" portrait) at about the area of
    height x width, each side rounded to `multiple` (at least one); BucketError for a malformed aspect."""
    try:
        w_part, h_part = (float(v) for v in aspect.split(":"))
        if w_part <= 0 or h_part <= 0:
            raise ValueError
    except ValueError:
        raise BucketError(f"--aspect {aspect!r} is not W:H with two positive numbers (e.g. 3:2 or 9:16)") from None
    ratio, area = w_part / h_part, height * width
    return (
        max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple),
        max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple),
    )


def sample_shapes(shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The shapes a training grid shows of a run on buckets: the most square one, then the landscape and the portrait
    ones nearest 3:2 and 2:3 (those there are), each (height, width) as given."""
    square = min(shapes, key=lambda s: (abs(math.log(s[1] / s[0])), s))
    out = [square]
    for target, side in ((1.5, 1), (1 / 1.5, -1)):
        candidates = [s for s in shapes if side * math.log(s[1] / s[0]) > 0]
        if candidates:
            out.append(min(candidates, key=lambda s: (abs(math.log(s[1] / s[0] / target)), s)))
    return out


def manifest_buckets(manifest: Any) -> list[dict[str, int]]:
    """The buckets a cache holds, {"height", "width", "count"} each; a cache built without --buckets (or before them)
    is one square bucket of its resolution holding every sample."""
    if getattr(manifest, "buckets", None):
        return [dict(b) for b in manifest.buckets]
    _, h, w = manifest.fields["latents"].shape
    return [{"height": h * VAE_DOWNSAMPLE, "width": w * VAE_DOWNSAMPLE, "count": manifest.num_samples}]
