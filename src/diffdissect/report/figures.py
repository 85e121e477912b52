"""Figures as PNG bytes, made from plain data (matplotlib, Agg backend; image grids with PIL)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from diffdissect.data.transforms import unit_to_uint8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 3, pad: int = 2) -> bytes:
    """(N, H, W, 3) uint8 images -> one PNG grid, upscaled with nearest-neighbour (pixels stay crisp)."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = unit_to_uint8(images)
    n, h, w = images.shape[:3]
    rows = max(1, -(-n // columns))
    cols = min(columns, n)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img[
            ..., :3
        ]
    picture = Image.fromarray(grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap(
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> bytes:
    plt = _pyplot()
    values = np.asarray(values, float)
    fig, ax = plt.subplots(figsize=(1.1 + 0.75 * len(col_labels), 0.9 + 0.45 * len(row_labels)))
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            r, g, b, _ = im.cmap(im.norm(v))  # dark cell -> white text, light -> black
            ax.text(
                j,
                i,
                fmt.format(v),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title)
    return png_bytes(fig)


def bar_chart(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str = "",
    ylabel: str = "",
    errors: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> bytes:
    """Grouped bars; `errors[name][i]` is a (low, high) interval drawn as an error bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(groups), 3.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (name, values) in enumerate(series.items()):
        heights = np.asarray(values, float)
        yerr = None
        if errors and name in errors:
            lo, hi = np.asarray(errors[name], float).T
            yerr = np.vstack([heights - lo, hi - heights])
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=name, yerr=yerr, capsize=3)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png_bytes(fig)
