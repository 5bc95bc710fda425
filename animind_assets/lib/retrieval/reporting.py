"""Beauty report helpers: published reference rows (labelled as published) and the comparison plot/table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


from animind_assets.lib.common.device import resolve_device  # noqa: F401  (the one device rule; re-exported)

# ----------------------------------------------------------------------------------- reporting
TIGER_PAPER_BEAUTY = {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}
TIGER_CF_BEAUTY = {"recall@5": 0.0376, "ndcg@5": 0.0252, "recall@10": 0.0582, "ndcg@10": 0.0319}
REPORT_METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def comparison_bar_png(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = REPORT_METRICS, title: str = "") -> bytes:
    """Grouped bars: one group per metric, one bar per row (model)."""
    from animind_assets.lib.common.plots import fig_to_png, plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        vals = [float(rows[name].get(m) or 0.0) for m in metrics]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, vals, width=width, label=name)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(list(metrics))
    ax.set_ylabel("score")
    ax.set_title(title or "Amazon Beauty, leave-one-out test")
    ax.legend(fontsize=7)
    return fig_to_png(fig)


def metrics_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = REPORT_METRICS) -> str:
    """Plain-text table for scripts."""
    name_w = max([len("model"), *(len(n) for n in rows)]) + 2
    widths = [max(10, len(c) + 2) for c in columns]
    head = f"{'model':<{name_w}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for name, vals in rows.items():
        cells = []
        for c, w in zip(columns, widths):
            v = vals.get(c)
            cells.append(f"{v:>{w}.4f}" if isinstance(v, (int, float)) and v == v else f"{'-':>{w}}")
        lines.append(f"{name:<{name_w}}" + "".join(cells))
    return "\n".join(lines)


