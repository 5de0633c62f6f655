"""A tiny procedurally drawn dataset: one coloured shape on a plain background, with a caption saying which.

    write_demo_images("runs/demo/images", n=256, size=64, seed=0)

writes 00000.png + 00000.txt ("a red circle on a blue background"), ... The captions fully describe the images
(shape, colour, background; position and size vary a little), so a student trained on them has structure to learn and
its loss falls within minutes on a CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """One image: `shape` in `colour` on `background`, its centre and radius jittered by rng."""
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.22, 0.34)  # shape half-width
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return image


def demo_caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def write_demo_images(directory: str | Path, n: int = 256, size: int = 64, seed: int = 0) -> list[Path]:
    """Write n images NNNNN.png (size x size) with same-stem .txt captions into `directory`; returns the image paths.

    Deterministic in (n, size, seed). Shape colour and background always differ.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(sorted(COLOURS), 2)
        image = draw_shape(shape, colour, background, size, rng)
        path = directory / f"{i:05d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(demo_caption(shape, colour, background) + "\n")
        paths.append(path)
    return paths
