"""Figures written by analyze and tune (matplotlib, Agg backend, files replaced atomically)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` (PNG) through a temporary file, then close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


AXIS_LABELS = {
    "consistency": "answer consistency (higher is better)",
    "perplexity": "perplexity of the queries (lower is better)",
    "self_certainty": "self-certainty (higher is better)",
}


def plot_pareto(
    points: Sequence[tuple[float, float]],
    numbers: Sequence[int],
    front: Sequence[int],
    pick: int,
    path: Path,
    *,
    names: Sequence[str] = ("consistency", "perplexity"),
) -> Path:
    """Every trial by its first two objectives (first on the y axis, second on the x axis), the front joined up,
    the pick marked and numbered. With more objectives the front is the one of all of them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[1] for p in points], [p[0] for p in points], s=18, color="0.6", label="trials")
    ordered = sorted(front, key=lambda i: points[i][1])
    ax.plot(
        [points[i][1] for i in ordered], [points[i][0] for i in ordered], "-o", color="tab:blue", label="Pareto front"
    )
    for i in ordered:
        ax.annotate(
            f"#{numbers[i]}", (points[i][1], points[i][0]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.scatter(
        [points[pick][1]],
        [points[pick][0]],
        marker="*",
        s=220,
        color="tab:red",
        zorder=5,
        label=f"pick #{numbers[pick]}",
    )
    ax.set_xlabel(AXIS_LABELS.get(names[1], names[1]))
    ax.set_ylabel(AXIS_LABELS.get(names[0], names[0]))
    ax.set_title("DoTS test-time search")
    ax.legend()
    return save_figure(fig, path)
