"""Lightning's CSVLogger, continued by a run restarted in its own directory.

Lightning deletes an existing `metrics.csv` when a logger starts in a directory that has one, so
a run restarted in place (a requeued job, `hydra.run.dir` of an interrupted run) would lose the
rows of the steps before its checkpoint. Here the restart keeps them: at its first save, the
earlier file is kept whole as `metrics.until-restart-<n>.csv`, and `metrics.csv` holds the
earlier rows of the steps before the first step the restart logs, then the restart's rows. An
exact resume logs the steps it trains again with the values they had.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ContinuedCSVLogger(CSVLogger):
    """`CSVLogger` whose `metrics.csv` survives a restart in the same directory."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Instead of deleting an earlier metrics.csv: remember it for the first save."""
        path = Path(self.metrics_file_path)
        self._earlier = path if path.is_file() and path.stat().st_size else None

    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            self._continue(self._earlier, min(int(m["step"]) for m in self.metrics))
            self._earlier = None
        super().save()

    def _continue(self, path: Path, first_step: int) -> None:
        """Keep the earlier file whole beside, and its rows before `first_step` in metrics.csv."""
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
        n = 1 + sum(1 for _ in path.parent.glob("metrics.until-restart-*.csv"))
        os.replace(path, path.with_name(f"metrics.until-restart-{n}.csv"))
        kept = [r for r in rows if r.get("step") and int(float(r["step"])) < first_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(fields))
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = sorted(fields)
