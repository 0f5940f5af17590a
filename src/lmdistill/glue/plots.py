"""The report's figures as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from lmdistill.glue.report_tables import Row, loss_curve  # noqa: E402


def score_vs_gflops(rows: list[Row], path: str | Path) -> Path:
    """Average dev score against GFLOPs per 128 tokens, one series per method."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = sorted({r.method for r in rows if r.average() is not None and r.gflops is not None})
    for method in methods:
        points = sorted(
            (r.gflops, r.average(), r.shape)
            for r in rows
            if r.method == method and r.average() is not None and r.gflops is not None
        )
        xs, ys, labels = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not methods:
        ax.text(0.5, 0.5, "no fine-tuned models with known GFLOPs", ha="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set_xlabel("GFLOPs per 128-token sequence")
    ax.set_ylabel("average dev score")
    ax.set_title("GLUE dev score vs inference cost")
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    return _save(fig, path)


def loss_curves(rows: list[Row], path: str | Path) -> Path:
    """Training loss per step of every distillation run (from its logs/metrics.csv)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = 0
    for r in rows:
        if r.summary_dir is None:
            continue
        steps, losses = loss_curve(r.summary_dir)
        if steps:
            ax.plot(steps, losses, label=f"{r.method} {r.shape}", linewidth=1)
            drawn += 1
    if drawn:
        ax.legend(fontsize=8)
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no distillation logs (logs/metrics.csv) found", ha="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_title("Distillation loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
