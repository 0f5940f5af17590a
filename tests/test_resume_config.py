"""Resuming checks the checkpoint's config: a changed setting is refused (one line naming the
keys) unless `resume.allow` names it; a finished run is reported, not trained again; an allowed
longer `trainer.max_steps` continues the learning-rate schedule; nothing of an earlier run (its
`.hydra/` record included) is overwritten.

One real 4-step run (module-scoped) provides the checkpoint; two more CLI runs resume it (one
refused, one allowed); the other cases call `lmdistill.distill.run` in-process or the schedule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, check_ok, read_metrics, run_cli, write_corpus
from test_distill_errors import _assert_one_error_line

from lmdistill.errors import UserError
from lmdistill.resume import CONFIG_KEY

STEPS = [
    "trainer.max_steps=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.save_top_k=-1",  # keep the step-2 checkpoint too
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("resume_config")
    write_corpus(path / "corpus.txt")
    return path


def _args(workdir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", *STEPS, *extra]


@pytest.fixture(scope="module")
def finished(workdir, cache_dir) -> Path:
    out = workdir / "finished"
    check_ok(run_cli([*_args(workdir), f"hydra.run.dir={out}"], workdir, cache_dir))
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run except its log (Hydra appends each later job's lines to it)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "distill.log"
    }


def _config(workdir: Path, out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("distill", overrides=_args(workdir, f"paths.output_dir={out}", *overrides))


# --- the record --------------------------------------------------------------------------------


def test_checkpoint_and_job_record_carry_the_resolved_config(finished):
    recorded = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)[CONFIG_KEY]
    assert recorded["config"]["optim"]["lr"] == 3e-4
    assert recorded["config"]["trainer"]["max_steps"] == 4
    assert recorded["config"]["method"]["_target_"] == "lmdistill.methods.MiniLMv2"
    assert recorded["resumes"] == []
    assert set(recorded["config"]) == {
        "teacher",
        "student",
        "method",
        "data",
        "optim",
        "trainer",
        "seed",
    }
    assert "trainer.max_steps=4" in (finished / ".hydra" / "overrides.yaml").read_text()
    assert (finished / ".hydra" / "config.yaml").is_file()
    assert (finished / ".hydra" / "hydra.yaml").is_file()
    assert json.loads((finished / "summary.json").read_text())["resumes"] == []


# --- refused: another setting ------------------------------------------------------------------


def test_restart_in_place_with_other_settings_is_refused_and_overwrites_nothing(
    finished, workdir, cache_dir
):
    before = _snapshot(finished)
    log_before = (finished / "distill.log").read_text()
    args = _args(workdir, "optim.lr=1e-3", "method=minilm_v1", f"hydra.run.dir={finished}")
    code, _, stderr = run_cli(args, workdir, cache_dir)
    line = _assert_one_error_line(
        code, stderr, str(finished / "checkpoints" / "last.ckpt"), "optim.lr (0.0003 -> 0.001)",
        "method._target_", "resume.allow=[", "optim.lr",
    )  # fmt: skip
    assert "lmdistill.methods.MiniLMv2" in line  # the checkpoint's value is named
    assert _snapshot(finished) == before  # .hydra/config.yaml and overrides.yaml included
    assert (finished / "distill.log").read_text().startswith(log_before)


def test_ckpt_path_file_with_other_settings_is_refused(finished, workdir, cache_dir):
    from lmdistill.distill import run

    out = workdir / "other_lr"
    ckpt = finished / "checkpoints" / "last.ckpt"
    cfg = _config(workdir, out, [f"ckpt_path={ckpt}", "optim.lr=1e-3", "trainer.max_steps=8"])
    with pytest.raises(UserError) as info:
        run(cfg)
    message = str(info.value)
    assert message.startswith(f"checkpoint {ckpt} was trained with other settings: ")
    assert "optim.lr (0.0003 -> 0.001), trainer.max_steps (4 -> 8);" in message
    assert message.endswith("resume.allow=[optim.lr,trainer.max_steps]")
    assert "\n" not in message
    assert not out.exists()


def test_allowing_some_keys_still_refuses_the_others(finished, workdir, cache_dir):
    from lmdistill.distill import run

    ckpt = finished / "checkpoints" / "last.ckpt"
    cfg = _config(
        workdir, workdir / "partly_allowed",
        [f"ckpt_path={ckpt}", "optim.lr=1e-3", "trainer.max_steps=8", "resume.allow=[trainer]"],
    )  # fmt: skip
    with pytest.raises(UserError, match=r"other settings: optim\.lr \(0\.0003 -> 0\.001\);"):
        run(cfg)


# --- finished runs -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["restart_in_place", "ckpt_path_last"])
def test_a_finished_run_is_reported_not_trained_again(how, finished, workdir, cache_dir, caplog):
    from lmdistill.distill import run

    before = _snapshot(finished)
    if how == "restart_in_place":
        out, extra = finished, []
    else:
        out, extra = workdir / "again", ["ckpt_path=last"]
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        summary = run(_config(workdir, out, extra))
    assert summary == json.loads((finished / "summary.json").read_text())
    lines = [r.getMessage() for r in caplog.records if r.name == "lmdistill"]
    assert len(lines) == 1 and lines[0].startswith("already finished: 4 steps"), lines
    assert (
        str(finished / "summary.json") in lines[0] and "not trained or exported again" in lines[0]
    )
    assert _snapshot(finished) == before
    assert not (workdir / "again").exists()


def test_a_checkpoint_past_max_steps_is_not_trained(finished, workdir, cache_dir):
    from lmdistill.distill import run

    ckpt = finished / "checkpoints" / "last.ckpt"
    cfg = _config(
        workdir, workdir / "fewer",
        [f"ckpt_path={ckpt}", "trainer.max_steps=3", "resume.allow=[trainer.max_steps]"],
    )  # fmt: skip
    with pytest.raises(
        UserError, match=r"\(step 4\) is past trainer.max_steps=3: nothing to train"
    ):
        run(cfg)
    assert not (workdir / "fewer").exists()


def test_more_steps_into_a_finished_directory_are_refused(finished, workdir, cache_dir):
    from lmdistill.distill import run

    before = _snapshot(finished)
    cfg = _config(workdir, finished, ["trainer.max_steps=8", "resume.allow=[trainer.max_steps]"])
    with pytest.raises(UserError, match="holds a finished run .*continue it in a new output"):
        run(cfg)
    assert _snapshot(finished) == before


def test_a_checkpoint_without_a_recorded_config_resumes_with_a_warning(
    finished, workdir, cache_dir, caplog
):
    """Checkpoints of earlier lmdistill versions: warned about, not refused."""
    from lmdistill.resume import check_resume

    checkpoint = torch.load(finished / "checkpoints" / "epoch=0-step=2.ckpt", weights_only=True)
    del checkpoint[CONFIG_KEY]
    cfg = _config(workdir, workdir / "old", ["optim.lr=1e-3"])
    with caplog.at_level(logging.WARNING, logger="lmdistill"):
        resume, finished_summary = check_resume(checkpoint, cfg, "old.ckpt")
    assert finished_summary is None and resume.step == 2 and not resume.config_checked
    assert "old.ckpt records no config" in caplog.text


# --- allowed: a longer run, a new learning rate ------------------------------------------------


def _independent_lr(peak: float, total: int, step: int) -> float:
    """transformers' schedule, stepped from 0: what an uninterrupted run uses at `step`."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = get_linear_schedule_with_warmup(optimizer, round(0.01 * total), total)
    for _ in range(step):
        optimizer.step()
        schedule.step()
    return schedule.get_last_lr()[0]


def test_allowed_longer_run_continues_the_schedule_and_says_so(finished, workdir, cache_dir):
    out = workdir / "longer"
    ckpt = finished / "checkpoints" / "last.ckpt"
    allowed = ["trainer.max_steps=8", "optim.lr=1e-3", "resume.allow=[trainer.max_steps,optim.lr]"]
    check_ok(
        run_cli(
            [*_args(workdir, f"ckpt_path={ckpt}", f"hydra.run.dir={out}"), *allowed],
            workdir,
            cache_dir,
        )
    )
    lrs = {
        int(r["step"]): r["lr-AdamW/pg1"]
        for r in read_metrics(out / "logs" / "metrics.csv")
        if "lr-AdamW/pg1" in r
    }
    assert sorted(lrs) == [4, 5, 6, 7]
    for step, lr in lrs.items():  # from the first resumed step on: the new run's schedule
        assert lr == pytest.approx(_independent_lr(1e-3, 8, step), rel=1e-12), step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    expected = {
        "checkpoint": str(ckpt), "step": 4, "config_checked": True,
        "allowed_differences": {"optim.lr": [3e-4, 1e-3], "trainer.max_steps": [4, 8]},
    }  # fmt: skip
    assert summary["resumes"] == [expected]
    provenance = json.loads((out / "student" / "lmdistill_provenance.json").read_text())
    assert provenance["resumes"] == [expected]
    recorded = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)[CONFIG_KEY]
    assert recorded["config"]["trainer"]["max_steps"] == 8 and recorded["resumes"] == [expected]


# --- the schedule itself -----------------------------------------------------------------------


def _trained_schedule(total: int, steps: int, lr: float = 3e-4):
    from lmdistill.schedule import LinearWarmupDecay

    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([parameter], lr=lr, betas=(0.9, 0.999))
    schedule = LinearWarmupDecay(optimizer, 0, total)
    for _ in range(steps):
        parameter.grad = torch.ones(2)
        optimizer.step()
        schedule.step()
    return optimizer, schedule


def test_restored_schedule_takes_this_runs_settings():
    from lmdistill.schedule import LinearWarmupDecay

    optimizer, schedule = _trained_schedule(total=4, steps=4)
    assert optimizer.param_groups[0]["lr"] == 0.0  # the end of the 4-step schedule
    saved_optimizer, saved_schedule = optimizer.state_dict(), schedule.state_dict()
    assert "_configured" not in saved_schedule
    # resumed with max_steps=8, lr 1e-3 and beta2 0.98; Lightning restores optimizer, then schedule
    parameter = torch.nn.Parameter(torch.ones(2))
    resumed = torch.optim.AdamW([parameter], lr=1e-3, betas=(0.9, 0.98))
    resumed_schedule = LinearWarmupDecay(resumed, 0, 8)
    resumed.load_state_dict(saved_optimizer)
    assert resumed.param_groups[0]["lr"] == 0.0  # what the first resumed step used before
    resumed_schedule.load_state_dict(saved_schedule)
    assert resumed_schedule.last_epoch == 4
    assert resumed.param_groups[0]["lr"] == _independent_lr(1e-3, 8, 4)  # 1e-3 * 4 / 8
    assert resumed.param_groups[0]["betas"] == (0.9, 0.98)
    assert resumed_schedule.get_last_lr() == [resumed.param_groups[0]["lr"]]
    # unchanged settings: the restored state is the saved one
    optimizer, schedule = _trained_schedule(total=8, steps=3)
    again = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=3e-4, betas=(0.9, 0.999))
    again_schedule = LinearWarmupDecay(again, 0, 8)
    again.load_state_dict(optimizer.state_dict())
    again_schedule.load_state_dict(schedule.state_dict())
    assert again.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert again_schedule.state_dict() == schedule.state_dict()
