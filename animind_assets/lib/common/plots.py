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
