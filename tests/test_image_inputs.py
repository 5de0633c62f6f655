"""What build_cache does to each image mode, EXIF orientation, caption encodings and symlinked inputs
(docs/CACHE_FORMAT.md, "Image modes"); each case against the expected pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyflux.cache.encode import (
    BAD_CAPTION_ENCODING,
    OUTSIDE_IMAGES,
    SkippedInput,
    load_image,
    prepare_image,
    to_rgb8,
)
from tinyflux.cache.inputs import folder_items


def _reopened(image: Image.Image, fmt: str, **save) -> Image.Image:  # noqa: ANN003
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return load_image(buffer.getvalue())


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_16_bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    image = _reopened(Image.fromarray(values), "PNG")
    assert image.mode == "I;16"
    assert _pixels(to_rgb8(image))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (_pixels(to_rgb8(image))[..., 0] == _pixels(to_rgb8(image))[..., 2]).all()  # gray: R = G = B


def test_float_tiff_is_read_as_0_to_1_and_clipped() -> None:
    values = np.array([[0.0, 0.25, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32)
    image = _reopened(Image.fromarray(values), "TIFF")
    assert image.mode == "F"
    assert _pixels(to_rgb8(image))[0, :, 1].tolist() == [0, 64, 128, 255, 255, 0]


def test_32_bit_integer_is_read_as_16_bit() -> None:
    image = Image.fromarray(np.array([[0, 65535, 100000, -5]], dtype=np.int32))
    assert image.mode == "I"
    assert _pixels(to_rgb8(image))[0, :, 0].tolist() == [0, 255, 255, 0]


def test_cmyk_palette_and_one_bit_images() -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    red_black = _pixels(to_rgb8(_reopened(cmyk, "JPEG", quality=100)))[0]
    assert np.abs(red_black - np.array([[255, 0, 0], [0, 0, 0]])).max() <= 3  # JPEG: within a few levels
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert _pixels(to_rgb8(_reopened(palette, "PNG")))[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    one_bit = Image.new("1", (2, 1), 0)
    one_bit.putpixel((1, 0), 1)
    assert _pixels(to_rgb8(one_bit))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_alpha_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # transparent red: white
    rgba.putpixel((2, 0), (0, 0, 255, 128))  # half blue: (127, 127, 255)
    out = _pixels(to_rgb8(_reopened(rgba, "PNG")))[0].tolist()
    assert out[0] == [255, 0, 0] and out[1] == [255, 255, 255] and out[2] == pytest.approx([127, 127, 255], abs=1)
    la = Image.new("LA", (1, 1), (0, 0))
    assert _pixels(to_rgb8(la))[0].tolist() == [[255, 255, 255]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    assert _pixels(to_rgb8(_reopened(palette, "PNG", transparency=0)))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_exif_orientation_6_is_applied() -> None:
    stored = Image.new("RGB", (64, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display (what phones write when held upright)
    shown = _pixels(prepare_image(_reopened(stored, "JPEG", quality=95, exif=exif), 64))
    assert shown[16, 48].tolist() == pytest.approx([255, 0, 0], abs=12)  # red is top-right once displayed
    assert shown[16, 16].tolist() == pytest.approx([0, 0, 255], abs=12)


def _folder(root: Path, outside: Path) -> None:
    root.mkdir()
    outside.mkdir()
    for name in ("good", "latin1", "linked_image", "linked_caption", "inner_link"):
        Image.new("RGB", (64, 64), "red").save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"caption of {name}")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    Image.new("RGB", (64, 64), "blue").save(outside / "secret.png")
    (outside / "secret.txt").write_text("a private note")
    (root / "linked_image.png").unlink()
    (root / "linked_image.png").symlink_to(outside / "secret.png")
    (root / "linked_caption.txt").unlink()
    (root / "linked_caption.txt").symlink_to(outside / "secret.txt")
    (root / "inner_link.png").unlink()
    (root / "inner_link.png").symlink_to(root / "good.png")  # inside --images: fine


def _outcomes(items) -> dict[str, str]:  # noqa: ANN001
    out = {}
    for item in items:
        try:
            out[item.key] = item.load()[1]
        except SkippedInput as skip:
            out[item.key] = skip.reason
    return out


def test_symlinks_out_of_images_and_non_utf8_captions_are_skipped(tmp_path: Path) -> None:
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    _folder(root, outside)
    assert _outcomes(folder_items(root)) == {
        "good": "caption of good",
        "inner_link": "caption of inner_link",
        "latin1": BAD_CAPTION_ENCODING,
        "linked_caption": OUTSIDE_IMAGES,
        "linked_image": OUTSIDE_IMAGES,
    }
    followed = _outcomes(folder_items(root, follow_symlinks=True))
    assert followed["linked_caption"] == "a private note" and followed["linked_image"] == "caption of linked_image"
    assert followed["latin1"] == BAD_CAPTION_ENCODING  # never decoded with replacement characters


def test_caption_bytes_are_strict_utf8_with_the_bom_dropped() -> None:
    from tinyflux.cache.encode import check_caption

    assert check_caption("\ufeffa caf\u00e9".encode()) == "a caf\u00e9"  # a .txt saved by Notepad, or a tar member
    with pytest.raises(SkippedInput) as info:
        check_caption("caf\xe9".encode("latin-1"))
    assert info.value.reason == BAD_CAPTION_ENCODING and "byte 3" in info.value.detail
