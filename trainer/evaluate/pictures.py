"""Pictures of visual-token alignment: words drawn on patch cells, per-layer curves, run-vs-run tables.

* the word pictures themselves come from ``visalign.pictures`` (``encoder_view``, ``word_grid_image``),
  shared with ``pipeline show``;
* ``side_by_side``, ``plot_layer_curves``, ``table_png``, ``markdown_table``: composition and summaries.

All output is PNG through PIL or matplotlib's Agg backend (no display needed).
Letters: H x W patch grid (rows x columns), S encoder input side in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image


def side_by_side(images: Sequence[Image.Image], gap: int = 12) -> Image.Image:
    """Images in one row, top-aligned, on a dark background (the Figure-1 comparison)."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    out = Image.new("RGB", (width, height), (20, 20, 20))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def plot_layer_curves(
    curves: Mapping[str, Mapping[str, Mapping[int, float]]], path: str | Path, title: str = ""
) -> Path:
    """One panel per measure, x = layer (0 = projector output), one line per run.

    ``curves``: ``{run name: {measure: {layer: value}}}``; measures missing from a run are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    measures: list[str] = []
    for per_run in curves.values():
        measures += [m for m in per_run if m not in measures]
    cols = min(3, max(1, len(measures)))
    rows = math.ceil(len(measures) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, measure in zip(axes.flat, measures):
        for run, per_run in curves.items():
            points = sorted((int(k), v) for k, v in per_run.get(measure, {}).items() if v == v)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run)
        ax.set_title(measure)
        ax.set_xlabel("layer (0 = projector output)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_png(headers: Sequence[str], rows: Sequence[Sequence], path: str | Path, title: str = "") -> Path:
    """The same table as ``markdown_table`` rendered by matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6 + 1.6 * (len(headers) - 1), 0.6 + 0.3 * (len(rows) + 1)))
    ax.axis("off")
    # the measure names are the long column: give it 40% of the width
    widths = [0.4] + [0.6 / max(1, len(headers) - 1)] * (len(headers) - 1)
    table = ax.table(
        cellText=[[_fmt(v) for v in r] for r in rows], colLabels=list(headers), colWidths=widths, loc="center"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
