"""The report's figures as PNG files (matplotlib, Agg backend: no display needed).

Every run has its own legend entry (`Row.label()`: run name, teacher, shape, steps, final loss),
so runs that share a method and a shape stay apart; the sub-networks of one once-for-all
super-net (`Row.family`) are one curve of score against GFLOPs; losses of different methods,
which are not on one scale (MiniLM v1's two relations, v2's three, MiniMoE's balance term), get
one panel each.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from lmdistill.glue.report_tables import Row, loss_curve  # noqa: E402

_MARKERS = "osD^vP*Xh<>p"


def score_vs_gflops_figure(rows: list[Row]):
    """Average dev score against GFLOPs per 128 tokens: one curve per once-for-all family (its
    sub-networks in order of GFLOPs, each point marked with its shape), a plain point per other
    model (a colour per method, a marker and a legend entry per run)."""
    fig, ax = plt.subplots(figsize=(8.8, 4.8))
    shown = [r for r in rows if r.average() is not None and r.gflops is not None]
    plain = [r for r in shown if r.family is None]
    methods = sorted({r.method for r in plain})
    for m, method in enumerate(methods):
        color = f"C{m % 10}"
        runs = sorted((r for r in plain if r.method == method), key=lambda r: (r.gflops, r.run))
        for i, r in enumerate(runs):
            ax.plot(r.gflops, r.average(), linestyle="none", color=color,
                    marker=_MARKERS[i % len(_MARKERS)], label=f"{method}: {r.label()}")  # fmt: skip
    families = sorted({r.family for r in shown if r.family is not None})
    for f, family in enumerate(families, start=len(methods)):
        members = sorted((r for r in shown if r.family == family), key=lambda r: (r.gflops, r.run))
        ax.plot([r.gflops for r in members], [r.average() for r in members], color=f"C{f % 10}",
                marker="o", linewidth=1.5,
                label=f"{members[0].method} family {family} ({len(members)} sub-networks)")  # fmt: skip
        for r in members:
            ax.annotate(r.shape, (r.gflops, r.average()), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=f"C{f % 10}")  # fmt: skip
    if not shown:
        ax.text(0.5, 0.5, "no fine-tuned models with known GFLOPs", ha="center",
                transform=ax.transAxes)  # fmt: skip
    ax.margins(x=0.08)  # room for the shape labels
    ax.set_xlabel("GFLOPs per 128-token sequence")
    ax.set_ylabel("average dev score")
    ax.set_title("GLUE dev score vs inference cost")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig


def score_vs_gflops(rows: list[Row], path: str | Path) -> Path:
    return save_figure(score_vs_gflops_figure(rows), path)


def loss_curves_figure(rows: list[Row]):
    """Training loss per step of every distillation run (its logs/metrics.csv): one panel per
    method, one line and legend entry per run."""
    curves: dict[str, list[tuple[Row, list[int], list[float]]]] = {}
    for r in rows:
        if r.summary_dir is None:
            continue
        steps, losses = loss_curve(r.summary_dir)
        if steps:
            curves.setdefault(r.method, []).append((r, steps, losses))
    if not curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.text(0.5, 0.5, "no distillation logs (logs/metrics.csv) found", ha="center",
                transform=ax.transAxes)  # fmt: skip
        ax.set(xlabel="step", ylabel="train/loss", title="Distillation loss")
        return fig
    methods = sorted(curves)
    cols = min(len(methods), 2)
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.4 * nrows), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for r, steps, losses in sorted(curves[method], key=lambda c: c[0].run):
            ax.plot(steps, losses, label=r.label(), linewidth=1)
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="train/loss", title=f"Distillation loss: {method}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    return fig


def loss_curves(rows: list[Row], path: str | Path) -> Path:
    return save_figure(loss_curves_figure(rows), path)


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG (creating the folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
