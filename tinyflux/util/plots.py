"""Loss curves as PNG files, drawn with matplotlib: raw and smoothed, log-scale values, labelled axes. The demo's
loss curve uses it, and so can a benchmark or the validation loss (several series on one figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

Points = Sequence[tuple[int, float]]


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the first values are not pulled
    towards 0 (s_k = m_k / (1 - weight^k) with m_k = weight * m_{k-1} + (1 - weight) * v_k)."""
    out, m = [], 0.0
    for k, v in enumerate(values, start=1):
        m = weight * m + (1 - weight) * v
        out.append(m / (1 - weight**k))
    return out


def plot_curves(
    series: Mapping[str, Points],
    path: Path,
    title: str,
    ylabel: str = "loss",
    log_scale: bool = True,
    smoothing: float = 0.9,
    size_px: tuple[int, int] = (640, 360),
) -> Path:
    """One line per series (name -> (step, value) points): raw values faint, their smoothed curve (smoothed()) solid
    in the same colour. A log y-axis where every value is positive: a loss falls over decades, and on a linear
    axis the first steps flatten the rest into a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    try:
        positive = True
        for i, (name, points) in enumerate(series.items()):
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            positive &= min(values) > 0
            color = f"C{i}"
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
            ax.plot(steps, smoothed(values, smoothing), color=color, linewidth=2, label=f"{name} (smoothed)")
        if log_scale and positive:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
