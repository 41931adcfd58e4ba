"""PNG figures for reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def confusion_matrix_png(metrics: dict[str, Any], path: Path, title: str) -> None:
    cm = metrics["confusion_matrix"]
    classes = metrics["classes"]
    fig, ax = plt.subplots(figsize=(4 + len(classes) * 0.5, 3.5 + len(classes) * 0.5))
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_png(series: dict[str, list[float]], path: Path, *, xlabel: str, title: str) -> None:
    """One panel per named series (e.g. loss, accuracy) against epoch or round."""
    panels = {name: {"": (list(range(1, len(ys) + 1)), ys)} for name, ys in series.items()}
    lines_png(panels, path, xlabel=xlabel, title=title)


def lines_png(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: Path,
    *,
    xlabel: str,
    title: str,
    references: dict[str, dict[str, float]] | None = None,
) -> None:
    """One panel per name (its y label), each with labelled lines ``label: (xs, ys)`` and,
    from ``references``, labelled horizontal lines (e.g. a target)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label or None)
        marks = (references or {}).get(name, {})
        for label, y in marks.items():
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if any(lines) or marks:  # a lone unlabelled line needs no legend
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stacked_bars_png(series: dict[str, list[float]], path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """One bar per step (e.g. round), stacked by named contributor (e.g. party)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(next(iter(series.values())))
    for name, ys in series.items():
        xs = range(1, len(ys) + 1)
        ax.bar(xs, ys, bottom=bottom, label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
