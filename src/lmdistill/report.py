"""lmdistill-report: one table and two plots for a set of distillation and fine-tuning runs.

    lmdistill-report outputs/ multirun/ [--out reports/] [--wandb]

Walks the directories for summary.json and results.json, joins fine-tuning runs to the
distillation run that exported their model (GLUE scores that `lmdistill-distill eval=glue` wrote
into summary.json count as its fine-tuning runs), and writes report.md, report.csv,
score_vs_gflops.png, loss_curves.png and quality_curves.png (held-out loss and
the STS-B probe against the step) to --out (default: the first directory). Fine-tuned
sub-networks of a once-for-all super-net (`ofa.export`, `lmdistill-export-subnet`) form a family:
a `family` column, and one curve per family in score_vs_gflops.png. Plain argparse rather than
Hydra: a report has no training configuration to compose.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmdistill.curves import plot_quality_curves
from lmdistill.errors import report_user_errors
from lmdistill.glue.report_tables import Row, build_rows, collect, to_csv, to_markdown


def make_report(dirs: list[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Write the report files; returns {name: path} (and the rows under "rows")."""
    from lmdistill.glue import plots

    summaries, results = collect(dirs)
    rows = build_rows(summaries, results)
    out = Path(out if out is not None else dirs[0]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(rows))
    files = {
        "report.md": out / "report.md",
        "report.csv": to_csv(rows, out / "report.csv"),
        "score_vs_gflops.png": plots.score_vs_gflops(rows, out / "score_vs_gflops.png"),
        "loss_curves.png": plots.loss_curves(rows, out / "loss_curves.png"),
        "quality_curves.png": plot_quality_curves(
            sorted({r.summary_dir for r in rows if r.summary_dir}), out / "quality_curves.png"
        ),  # val/loss and the STS-B probe against the step
    }
    return {**files, "rows": rows}


def log_to_wandb(files: dict, project: str = "lmdistill") -> None:
    """The table and the images as one W&B run (offline unless WANDB_MODE says otherwise)."""
    import csv

    import wandb

    rows: list[Row] = files["rows"]
    run = wandb.init(
        project=project,
        job_type="report",
        dir=str(files["report.md"].parent),
        mode=os.environ.get("WANDB_MODE", "offline"),
    )
    try:
        with open(files["report.csv"], newline="") as f:
            records = list(csv.reader(f))
        run.log(
            {
                "report": wandb.Table(columns=records[0], data=records[1:]),
                "score_vs_gflops": wandb.Image(str(files["score_vs_gflops.png"])),
                "loss_curves": wandb.Image(str(files["loss_curves.png"])),
                "quality_curves": wandb.Image(str(files["quality_curves.png"])),
            }
        )
        run.summary["models"] = len(rows)
    finally:
        wandb.finish()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmdistill-report", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", help="where to write the report (default: the first directory)")
    parser.add_argument("--wandb", action="store_true", help="also log the report to W&B")
    parser.add_argument("--project", default="lmdistill", help="W&B project (with --wandb)")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    files = make_report(args.dirs, args.out)
    if args.wandb:
        log_to_wandb(files, args.project)
    print(files["report.md"].read_text())
    print("wrote " + ", ".join(str(p) for k, p in files.items() if k != "rows"))


if __name__ == "__main__":
    main()
