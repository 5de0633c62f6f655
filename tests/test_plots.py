"""tinyflux.util.plots: TensorBoard's debiased smoothing against its closed form, and a curve PNG drawn by matplotlib."""

import math

import numpy as np
import pytest
from PIL import Image

from tinyflux.util.plots import plot_curves, smoothed


def test_smoothing_is_the_debiased_moving_average():
    assert smoothed([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # a constant stays put: no pull to 0
    w, a, b = 0.9, 2.0, 1.0
    assert smoothed([a, b], w) == pytest.approx([a, (w * (1 - w) * a + (1 - w) * b) / (1 - w**2)])
    assert smoothed([5.0, 1.0], 0.0) == [5.0, 1.0]  # weight 0: the raw values


def test_a_curve_png_has_the_size_asked_and_both_series_drawn(tmp_path):
    loss = [(s, 2.0 * math.exp(-s / 30) + 0.01) for s in range(0, 200, 5)]
    val = [(s, 2.2 * math.exp(-s / 40) + 0.02) for s in range(0, 200, 50)]
    path = plot_curves({"train": loss, "validation": val}, tmp_path / "curve.png", "loss", size_px=(640, 360))
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape == (360, 640, 3)
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's C0 and C1: one per series
        assert (np.abs(image - rgb).sum(axis=-1) < 30).sum() > 200, rgb
