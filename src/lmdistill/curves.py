"""Quality during distillation as a figure: `val/loss` and `val/stsb_spearman` against the step,
one line per run (read from each run's logs/metrics.csv; a teacher-assistant run's stage 1,
`assistant/val/...`, is a line of its own). The teacher's probe figure, logged once, is a dotted
line of the run's colour. `lmdistill-report` draws it as quality_curves.png.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

from lmdistill.glue.plots import save_figure
from lmdistill.methods.assistant_chain import ASSISTANT_PREFIX

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

PANELS = (("val/loss", "held-out loss (val/loss)"),
          ("val/stsb_spearman", "STS-B Spearman (val/stsb_spearman)"))  # fmt: skip
TEACHER = "val/stsb_spearman_teacher"


def read_series(
    path: str | Path, names: tuple[str, ...]
) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of the rows of a CSVLogger metrics.csv that hold `name`."""
    series: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in names}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            for name in names:
                if record.get(name) not in (None, ""):
                    series[name][0].append(int(float(record["step"])))
                    series[name][1].append(float(record[name]))
    return series


def quality_series(run_dirs: list[str | Path]) -> dict[str, dict]:
    """{run label: {name: (steps, values)}} of the runs that logged a validation figure; a
    teacher-assistant run's stage 1 (`assistant/val/...`) is a line of its own."""
    names = (*(name for name, _ in PANELS), TEACHER)
    found = {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "logs" / "metrics.csv"
        if not path.is_file():
            continue
        stages = {f"{run_dir.name}/assistant": ASSISTANT_PREFIX, run_dir.name: ""}
        for label, prefix in stages.items():
            series = read_series(path, tuple(prefix + name for name in names))
            series = {name: series[prefix + name] for name in names}
            if any(series[name][0] for name, _ in PANELS):
                found[label] = series
    return found


def plot_quality_curves(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """Write the figure to `out_path` (PNG); runs without validation rows are left out."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6.4 * len(PANELS), 4.4), squeeze=False)
    for i, (label, series) in enumerate(quality_series(run_dirs).items()):
        color = f"C{i % 10}"
        for ax, (name, _) in zip(axes[0], PANELS, strict=True):
            steps, values = series[name]
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, color=color, label=label)
        teacher = series[TEACHER][1]
        if teacher:
            axes[0][1].axhline(teacher[-1], color=color, linestyle=":", linewidth=1,
                               label=f"{label}: teacher")  # fmt: skip
    for ax, (name, title) in zip(axes[0], PANELS, strict=True):
        ax.set(xlabel="step", ylabel=name, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", transform=ax.transAxes)
    return save_figure(fig, out_path)
