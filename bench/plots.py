"""Learning curves as PNG files: a bench writes its score against optimiser steps next to its table
(BENCHMARKS.md embeds them). matplotlib's Agg backend: no display, the same file on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def curve_png(path: Path, series: Mapping[str, Sequence[tuple[float, float]]], *, title: str,
              xlabel: str = "optimiser steps per hospital", ylabel: str = "",
              bars: Mapping[str, float] | None = None, logy: bool = False) -> Path:
    """One line per series (x, y points; several seeds of one name are averaged per x), each
    ``bars`` value a dashed horizontal line; ``logy`` for scores spanning decades (a Fréchet
    factor from hundreds down to a bar of 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, pts in series.items():
        by_x: dict[float, list[float]] = {}
        for x, y in pts:
            by_x.setdefault(float(x), []).append(float(y))
        xs = sorted(by_x)
        ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], marker="o", label=name)
    for name, y in (bars or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="grey")
        ax.annotate(name, (ax.get_xlim()[0], y), textcoords="offset points", xytext=(4, 3),
                    fontsize=8, color="grey")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
