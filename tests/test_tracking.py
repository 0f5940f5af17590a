"""W&B tracking: one offline run per job, grouped per sweep, named per job, the config logged.

The offline run files (`<job>/wandb/offline-run-*/run-*.wandb`) are read back directly
(`wandb_offline.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from cli_helpers import TINY, check_ok, compose_distill, read_metrics, run_cli, write_corpus
from wandb_offline import history, read_offline_run, read_offline_summary

from lmdistill.resources import sweep_group

# --- real runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("tracking")
    write_corpus(path / "corpus.txt")
    return path


@pytest.fixture(scope="module")
def single(workdir, cache_dir) -> Path:
    out = workdir / "single"
    check_ok(
        run_cli(
            [
                *TINY,
                f"data.paths=[{workdir / 'corpus.txt'}]",
                "trainer.max_steps=3",
                "trainer.val_check_interval=2",
                "data.val_batches=1",
                "logger=[csv,wandb,tensorboard]",
                f"hydra.run.dir={out}",
            ],  # fmt: skip
            workdir,
            cache_dir,
        )
    )
    return out


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


def test_sweep_jobs_share_the_sweeps_group(tiny_sweep):
    runs = [read_offline_run(job)[0] for job in _jobs(tiny_sweep)]
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    groups = {run.run_group for run in runs}
    assert groups == {"sweep"}  # hydra.sweep.dir relative to where the sweep was started
    assert groups == {sweep_group(str(tiny_sweep), str(tiny_sweep.parent))}
    assert {run.project for run in runs} == {"lmdistill"}


def test_sweep_jobs_are_named_after_their_directories(tiny_sweep):
    jobs = _jobs(tiny_sweep)
    names = [read_offline_run(job)[0].display_name for job in jobs]
    assert names == [job.name for job in jobs]  # 0_..._method-minilm_v1_...
    assert len(set(names)) == 2 and all(names)


def test_sweep_jobs_log_their_resolved_config(tiny_sweep):
    targets = {}
    for job in _jobs(tiny_sweep):
        _, config = read_offline_run(job)
        assert "${" not in json.dumps(config)  # resolved, interpolations and resolvers alike
        assert config["trainer"]["max_steps"] == 2
        assert config["logger"]["wandb"]["group"] == "sweep"
        assert config["logger"]["wandb"]["name"] == job.name
        assert config["paths"]["output_dir"] == str(job)
        assert config["data"]["paths"] == [str(tiny_sweep.parent / "corpus.txt")]
        method = re.search(r"_method-(minilm_v[12])(_|$)", job.name)[1]  # the job's own override
        targets[method] = config["method"]["_target_"]
    assert targets == {
        "minilm_v1": "lmdistill.methods.MiniLMv1",
        "minilm_v2": "lmdistill.methods.MiniLMv2",
    }


# --- job directories a shell and Hydra's override grammar take without quoting ------------------

PLAIN = re.compile(r"^[A-Za-z0-9._+-]+$")  # [A-Za-z0-9._,=+-] less `,` (a Hydra sweep) and `=`


def _takes_unquoted(job: Path) -> None:
    """`job.name` needs no quoting in a shell, and `model=<job>/student` (relative or absolute)
    is one plain value in Hydra's override grammar."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert PLAIN.match(job.name), job.name
    assert shlex.quote(job.name) == job.name and shlex.split(job.name) == [job.name]
    assert not job.name.startswith(("-", ".", "+", "~"))
    parser = OverridesParser.create()
    for value in (f"{job.name}/student", f"{job}/student"):
        override = parser.parse_override(f"model={value}")
        assert not override.is_sweep_override() and override.value() == value, value


def test_sweep_job_directories_need_no_quoting(tiny_sweep):
    jobs = _jobs(tiny_sweep)
    assert len(jobs) == 2
    for i, job in enumerate(jobs):  # the overrides as typed, sorted; sweep-only ones excluded
        typed = sorted([*TINY, f"method=minilm_v{i + 1}", "logger=[csv,wandb]"])
        expected = "_".join(typed).replace("=", "-").replace("[csv,wandb]", "csv+wandb")
        assert job.name == f"{i}_{expected}"
        assert "_logger-csv+wandb_" in job.name and "_student-tiny_" in job.name
        _takes_unquoted(job)


def _sweep_subdir(overrides: list[str], num: int) -> str:
    """hydra.sweep.subdir of job `num` as Hydra resolves it (override_dirname computed by Hydra
    from `overrides` with the shipped kv_sep, item_sep and exclude_keys)."""
    from omegaconf import OmegaConf, open_dict, read_write

    cfg = compose_distill(overrides)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.job.num = num
    return OmegaConf.select(cfg, "hydra.sweep.subdir")


AWKWARD = {  # overrides as typed -> the directory name after `<num>_`
    "list": (["logger=[csv,wandb]", "optim.betas=[0.9, 0.98]"],
             "logger-csv+wandb_optim.betas-0.9+0.98"),
    "dict": (["method.relation_weights={qq: 1, kk:0.5 , vv: 2}"],
             "method.relation_weights-qq-1+kk-0.5+vv-2"),
    "path with a space": (["teacher.name_or_path='/models/my bert*'"],
                          "teacher.name_or_path-.models.my_bert_"),
    "append, number, =": (["+notes='a;b&c=d'", "optim.lr=1e-5"], "+notes-a_b_c-d_optim.lr-1e-5"),
    "excluded only": (["seed=3", "trainer.max_steps=5"], ""),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(AWKWARD))
def test_awkward_values_give_plain_job_directories(case, tmp_path, cache_dir):
    overrides, expected = AWKWARD[case]
    name = _sweep_subdir(overrides, 12)
    assert name == (f"12_{expected}" if expected else "12")
    _takes_unquoted(tmp_path / "multirun" / "d" / name)


def test_long_job_directory_names_are_cut_with_a_hash(tmp_path, cache_dir):
    from lmdistill.resources import job_dirname

    a = _sweep_subdir([f"+notes={'x' * 300}a"], 3)
    b = _sweep_subdir([f"+notes={'x' * 300}b"], 3)
    assert len(a) == len(b) == 200 and a != b and a[:189] == b[:189] == f"3_+notes-{'x' * 180}"
    assert re.fullmatch(r"[0-9a-f]{10}", a[-10:]) and a[-11] == "_"
    assert job_dirname(3, "") == "3"
    _takes_unquoted(tmp_path / a)


def test_single_run_has_no_group(single):
    run, config = read_offline_run(single)
    assert run.run_group == "" and config["logger"]["wandb"]["group"] is None
    hydra = yaml.safe_load((single / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert run.display_name == hydra["job"]["override_dirname"]  # its overrides
    assert "_student-tiny_" in run.display_name
    assert config["trainer"]["max_steps"] == 3


def _wandb_file(job: Path) -> Path:
    (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
    return run_file


def test_wandb_summary_holds_the_runs_summary(single):
    summary = json.loads((single / "summary.json").read_text())
    logged = read_offline_summary(_wandb_file(single))
    assert {k: logged.get(k) for k in summary} == summary  # final_loss, val_loss, precision, ...
    assert summary["steps"] == 3 and summary["val_step"] == 3 and summary["final_loss"] > 0
    assert logged["teacher"]["layer"] == summary["teacher"]["layer"] == 2  # tiny: 2 layers


def _csv_metrics(job: Path) -> dict[tuple[str, int], float]:
    rows = read_metrics(job / "logs" / "metrics.csv")
    return {(k, int(row["step"])): v for row in rows for k, v in row.items() if k != "step"}


def _tensorboard_metrics(job: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = job.glob("tensorboard/events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    return {(tag, e.step): e.value for tag in scalars.Tags()["scalars"]
            for e in scalars.Scalars(tag)}  # fmt: skip


def test_every_logger_gets_the_same_metrics_at_the_same_steps(single):
    csv = _csv_metrics(single)
    assert {("train/loss", 0), ("train/loss", 2), ("val/loss", 1), ("val/loss", 2)} <= set(csv)
    for logged in (history(_wandb_file(single)), _tensorboard_metrics(single)):
        assert set(logged) == set(csv)
        assert logged == pytest.approx(csv, rel=1e-6)


# --- the resolvers, in-process --------------------------------------------------------------------


@pytest.fixture
def hydra_job(cache_dir):
    """Set Hydra's job config as a launcher would (started in /home/me/project)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    saved = HydraConfig.instance().cfg

    def make(overrides, mode, output_dir, sweep_dir="multirun/x", dirname=None):
        cfg = compose_distill(["logger=wandb", *overrides])
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.mode = RunMode[mode]
            if dirname is not None:
                cfg.hydra.job.override_dirname = dirname
            cfg.hydra.sweep.dir = sweep_dir
            cfg.hydra.runtime.output_dir = output_dir
            cfg.hydra.runtime.cwd = "/home/me/project"
        HydraConfig.instance().set_config(cfg)
        wandb = OmegaConf.to_container(cfg.logger.wandb, resolve=True)  # as the job resolves it
        return wandb["group"], wandb["name"]

    yield make
    HydraConfig.instance().cfg = saved


def test_group_and_name_in_a_sweep(hydra_job):
    a = hydra_job([], "MULTIRUN", "/home/me/project/multirun/d/t1/3_seed=1", "multirun/d/t1")
    assert a == ("multirun/d/t1", "3_seed=1")
    b = hydra_job([], "MULTIRUN", "/scratch/sw/0", "/scratch/sw")  # outside the project
    assert b == ("/scratch/sw", "0")
    c = hydra_job([], "MULTIRUN", "/home/me/project/multirun/d/t2/3_seed=1", "multirun/d/t2")
    assert c[0] != a[0]  # another sweep, another group


def test_single_run_without_overrides_is_named_after_its_directory(hydra_job):
    assert hydra_job([], "RUN", "/home/me/project/outputs/d/t", dirname="") == (None, "outputs/d/t")
    assert hydra_job([], "RUN", "/home/me/project/outputs/d/t", dirname="seed=3") == (
        None,
        "seed=3",
    )


def test_group_and_name_can_be_overridden(hydra_job):
    overrides = ["logger.wandb.group=ablation", "logger.wandb.name=baseline"]
    assert hydra_job(overrides, "MULTIRUN", "/o") == ("ablation", "baseline")


# --- the CSV log behind the report's loss curves ------------------------------------------------

README = Path(__file__).parents[1] / "README.md"


def test_tensorboard_keeps_the_csv_log(tmp_path, cache_dir):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_distill(["logger=tensorboard", f"paths.output_dir={tmp_path}"])
    loggers = OmegaConf.to_container(cfg.logger, resolve=True)
    assert sorted(loggers) == ["csv", "tensorboard"]
    for conf in loggers.values():
        logger = instantiate(conf)
        logger.log_metrics({"train/loss": 1.5}, step=0)
        logger.finalize("success")
    assert (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[-1] == "0,1.5"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_learning_rate_columns_are_named_as_the_readme_says(tiny_sweep):
    import csv

    for job in _jobs(tiny_sweep):
        with open(job / "logs" / "metrics.csv", newline="") as f:
            columns = next(csv.reader(f))
        assert [c for c in columns if c.startswith("lr-")] == ["lr-AdamW/pg1", "lr-AdamW/pg2"]
    readme = README.read_text()
    assert "`lr-AdamW/pg1`" in readme and "`lr-AdamW/pg2`" in readme
    assert not re.search(r"`lr-AdamW`", readme)
