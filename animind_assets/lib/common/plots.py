"""Matplotlib figures rendered to PNG bytes (headless, Agg backend)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def fig_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def histogram_png(values: Sequence[float] | np.ndarray, title: str, xlabel: str, bins: int = 50) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(np.asarray(values, dtype=float), bins=bins, color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return fig_to_png(fig)


def bar_png(counts: Mapping[str, float], title: str, ylabel: str = "count") -> bytes:
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = list(counts.keys())
    ax.bar(range(len(labels)), list(counts.values()), color="#55a868")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return fig_to_png(fig)


def lines_png(
    series: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str = "epoch",
    ylabel: str = "",
    logy: bool = False,
) -> bytes:
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), list(ys), label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig_to_png(fig)


# ------------------------------------------------------------------------------------------------
# tiny SVG charts: small enough (< ~700 characters) for metadata viewers that render short
# markdown inline (Dagster shows markdown metadata under 1,000 characters without a click)
# ------------------------------------------------------------------------------------------------
_SVG_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _svg(width: int, height: int, body: str) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{body}</svg>'


def bars_svg(values: Mapping[str, float], width: int = 180, height: int = 48, ymax: float | None = None) -> str:
    """One bar per value (left to right, first 24), scaled to ``ymax`` (default: the largest value);
    returns the SVG document as a string."""
    vals = [max(0.0, float(v)) for v in list(values.values())[:24]]
    top = float(ymax) if ymax else (max(vals) if vals and max(vals) > 0 else 1.0)
    n = max(1, len(vals))
    w = width / n
    d = []
    for i, v in enumerate(vals):
        h = int(round(min(1.0, v / top) * (height - 2)))
        if h:
            d.append(f"M{int(i * w) + 1} {height}V{height - h}h{max(1, int(w) - 2)}V{height}")
    body = f'<rect width="{width}" height="{height}" fill="#f6f6f6"/><path fill="{_SVG_COLORS[2]}" d="{"".join(d)}"/>'
    return _svg(width, height, body)


def lines_svg(series: Mapping[str, Sequence[float]], width: int = 180, height: int = 48, max_points: int = 24,
              logy: bool = False) -> str:
    """One polyline per series (first 4 series), each downsampled to ``max_points`` points, all on
    one y scale (log10 when ``logy``); returns the SVG document as a string."""
    cleaned = {}
    for name, ys in list(series.items())[:4]:
        arr = np.asarray(list(ys), dtype=float)
        arr = arr[np.isfinite(arr)]
        if logy:
            arr = np.log10(np.clip(arr, 1e-12, None))
        if arr.size:
            idx = np.unique(np.linspace(0, arr.size - 1, min(max_points, arr.size)).round().astype(int))
            cleaned[name] = (arr[idx], idx / max(1, arr.size - 1))
    body = [f'<rect width="{width}" height="{height}" fill="#f6f6f6"/>']
    if cleaned:
        lo = min(float(a.min()) for a, _ in cleaned.values())
        hi = max(float(a.max()) for a, _ in cleaned.values())
        span = hi - lo if hi > lo else 1.0
        for i, (ys, xs) in enumerate(cleaned.values()):
            pts = " ".join(f"{int(x * (width - 2)) + 1},{int(round((1 - (y - lo) / span) * (height - 4))) + 2}" for y, x in zip(ys, xs))
            body.append(f'<polyline fill="none" stroke="{_SVG_COLORS[i % len(_SVG_COLORS)]}" points="{pts}"/>')
    return _svg(width, height, "".join(body))
