"""lmdistill.curves: validation figures read back from metrics.csv files and drawn."""

from __future__ import annotations

import matplotlib.image

from lmdistill.curves import plot_quality_curves, quality_series

HEADER = "epoch,step,train/loss,val/loss,val/stsb_spearman,val/stsb_spearman_teacher\n"
CHAIN_HEADER = "epoch,step,assistant/val/loss,assistant/val/stsb_spearman,val/loss\n"


def _run(root, rows: str, header: str = HEADER):
    logs = root / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(header + rows)
    return root


def test_series_hold_the_validation_rows_of_each_run(tmp_path):
    validated = _run(tmp_path / "a", "0,0,,,,0.8\n0,0,2.0,,,\n0,1,1.5,,,\n0,1,,1.2,0.31,\n"
                                     "0,3,1.1,,,\n0,3,,0.9,0.42,\n")  # fmt: skip
    untouched = _run(tmp_path / "b", "0,0,2.0,,,\n0,1,1.8,,,\n")
    chain = _run(tmp_path / "c", "0,4,0.7,0.2,\n0,9,,,0.5\n", header=CHAIN_HEADER)
    series = quality_series([validated, untouched, chain])
    assert list(series) == ["a", "c/assistant", "c"]
    assert series["c/assistant"]["val/loss"] == ([4], [0.7])
    assert series["c/assistant"]["val/stsb_spearman"] == ([4], [0.2])
    assert series["c"]["val/loss"] == ([9], [0.5])
    assert series["a"]["val/loss"] == ([1, 3], [1.2, 0.9])
    assert series["a"]["val/stsb_spearman"] == ([1, 3], [0.31, 0.42])
    assert series["a"]["val/stsb_spearman_teacher"] == ([0], [0.8])
    assert series["c"]["val/stsb_spearman"] == ([], [])


def test_the_figure_is_written_with_and_without_validated_runs(tmp_path):
    run = _run(tmp_path / "a", "0,1,,1.2,0.31,0.8\n0,3,,0.9,0.42,\n")
    for dirs, name in (([run], "quality.png"), ([tmp_path / "none"], "empty.png")):
        path = plot_quality_curves(dirs, tmp_path / "out" / name)
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 200
