"""DDP with 2 CPU processes (gloo): loss parity, rank-disjoint data, exact resume of every rank,
and -m sweeps whose jobs run DDP (each job once, on every rank, with the job's own config)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import TINY, check_ok, cli_env, pythonpath, read_metrics, run_cli, step_losses

TESTS = Path(__file__).parent
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=4"]
YEARS = range(1900, 1960)  # one marker per document; each year is one token in BERT's vocabulary


def write_marked_corpus(path: Path) -> Path:
    """60 documents; every sentence of document n mentions the year 1900 + n and nothing else
    does, so the years in a batch tell which documents it came from."""
    rng = random.Random(0)
    verbs = ["built", "painted", "repaired", "visited", "described", "measured", "sold", "moved"]
    things = ["the bridge", "a mill", "the harbour", "an old school", "the station", "a farm"]
    docs = []
    for year in YEARS:
        sentences = [
            f"In {year} the town {rng.choice(verbs)} {rng.choice(things)} near the river."
            for _ in range(rng.randint(6, 10))
        ]
        docs.append(" ".join(sentences[:4]) + "\n" + " ".join(sentences[4:]))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _env(cache_dir: Path) -> dict:
    return cli_env(cache_dir, PYTHONPATH=pythonpath(TESTS))


def _recorded(out: Path, rank: int) -> list[dict]:
    lines = (out / f"batches_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _years(batches: list[dict], year_ids: dict[int, int]) -> set[int]:
    return {year_ids[t] for b in batches for seq in b["ids"] for t in seq if t in year_ids}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("ddp")
    write_marked_corpus(path / "corpus.txt")
    return path


def _ddp_cli(workdir, cache_dir, out: Path, *extra: str):
    record = [
        "+callbacks.record._target_=probes.RecordBatches",
        f"+callbacks.record.path={out}",
    ]  # fmt: skip
    args = [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", *DDP, *record,
            f"hydra.run.dir={out}", *extra]  # fmt: skip
    return check_ok(run_cli(args, workdir, cache_dir, env=_env(cache_dir)))


@pytest.fixture(scope="module")
def ddp_runs(workdir, cache_dir) -> tuple[Path, Path]:
    """6 DDP steps with checkpoints every 3 (kept), and a DDP run that resumes it from step 3
    with `ckpt_path=last`: the newest earlier run is made an interrupted one, whose last.ckpt is
    the step-3 checkpoint."""
    from lmdistill.runs import record_run

    full, resumed = workdir / "full", workdir / "resumed"
    keep = ["trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3",
            "callbacks.model_checkpoint.save_top_k=-1"]  # fmt: skip
    _ddp_cli(workdir, cache_dir, full, *keep)
    interrupted = workdir / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(
        full / "checkpoints" / "epoch=0-step=3.ckpt", interrupted / "checkpoints" / "last.ckpt"
    )
    record_run(cache_dir, _config_key(full / "distill.log", 0), interrupted)
    _ddp_cli(workdir, cache_dir, resumed, *keep, "ckpt_path=last")
    return full, resumed


@pytest.fixture(scope="module")
def year_ids(tiny_teacher_dir) -> dict[int, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    ids = {tokenizer.convert_tokens_to_ids(str(year)): year for year in YEARS}
    assert len(ids) == len(YEARS) and tokenizer.unk_token_id not in ids
    return ids


def test_ranks_train_on_disjoint_documents(ddp_runs, year_ids):
    full, _ = ddp_runs
    rank0, rank1 = _recorded(full, 0), _recorded(full, 1)
    assert [b["step"] for b in rank0] == [b["step"] for b in rank1] == list(range(6))
    years0, years1 = _years(rank0, year_ids), _years(rank1, year_ids)
    assert len(years0) >= 3 and len(years1) >= 3, (years0, years1)
    assert not years0 & years1  # a document is read by one rank only


def test_global_batch_and_learning_rate_are_logged(ddp_runs):
    full, _ = ddp_runs
    rows = read_metrics(full / "logs" / "metrics.csv")
    assert {r["train/global_batch_size"] for r in rows if "train/global_batch_size" in r} <= {8.0}
    assert any(key.startswith("lr-") for r in rows for key in r)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["global_batch_size"] == 8
    assert summary["tokens_seen"] == sum(  # both ranks' tokens are counted
        len(seq) for rank in (0, 1) for b in _recorded(full, rank) for seq in b["ids"]
    )


def test_ranks_log_the_same_config_and_their_own_log_file(ddp_runs):
    full, _ = ddp_runs
    keys = {_config_key(full / "distill.log", 0), _config_key(full / "distill_rank1.log", 1)}
    assert len(keys) == 1


def test_resume_restores_every_ranks_data_position_and_losses(ddp_runs, workdir):
    """`ckpt_path=last`: rank 0 records the resumed run before it launches rank 1, which
    resumes from rank 0's checkpoint all the same."""
    full, resumed = ddp_runs
    checkpoint = workdir / "interrupted" / "checkpoints" / "last.ckpt"
    for log in ("distill.log", "distill_rank1.log"):
        assert f"resuming from {checkpoint}\n" in (resumed / log).read_text(), log
    for rank in (0, 1):
        after = {b["step"]: b for b in _recorded(resumed, rank)}
        before = {b["step"]: b for b in _recorded(full, rank)}
        assert sorted(after) == [3, 4, 5]
        for step in (3, 4, 5):  # same batches on each rank, no batch repeated or skipped
            assert after[step]["ids"] == before[step]["ids"], (rank, step)
            assert after[step]["loss"] == before[step]["loss"], (rank, step)  # bitwise
    c, b = step_losses(full / "logs" / "metrics.csv"), step_losses(resumed / "logs" / "metrics.csv")
    assert all(b[s] == c[s] for s in (3, 4, 5))


def test_resume_with_another_rank_count_is_a_user_error(ddp_runs, workdir, cache_dir):
    full, _ = ddp_runs
    out = workdir / "single"
    code, _, err = run_cli(
        [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", "trainer.max_steps=6",
         f"ckpt_path='{full / 'checkpoints' / 'last.ckpt'}'", f"hydra.run.dir={out}"],
        workdir, cache_dir,
    )  # fmt: skip
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lmdistill: error:") and "2 process" in line and "has 1" in line
    assert not (out / "checkpoints").exists()


def _config_key(log: Path, rank: int) -> str:
    match = re.search(rf"rank {rank} of 2: config (\w+)", log.read_text())
    assert match, log.read_text()[-2000:]
    return match.group(1)


# --- parity with one process ----------------------------------------------------------------


def test_ddp_loss_trajectory_matches_one_process_with_the_same_global_batch(
    tmp_path, tiny_teacher_dir, cache_dir
):
    script = TESTS / "ddp_parity_script.py"
    for devices in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(script), tiny_teacher_dir, str(devices), str(tmp_path / str(devices))],
            cwd=tmp_path, env=cli_env(cache_dir), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "1" / "losses_rank0.json").read_text())
    ranks = [json.loads((tmp_path / "2" / f"losses_rank{r}.json").read_text()) for r in (0, 1)]
    ddp = [(a + b) / 2 for a, b in zip(*ranks, strict=True)]  # each rank: mean of its half
    assert len(single) == 6
    assert ddp == pytest.approx(single, rel=1e-4)
    assert ranks[0] != pytest.approx(ranks[1], rel=1e-3)  # the ranks really saw different data


# --- a -m sweep of DDP jobs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_sweep(workdir, cache_dir) -> Path:
    out = workdir / "sweep"
    check_ok(
        run_cli(
            ["-m", *TINY, f"data.paths=[{workdir / 'corpus.txt'}]", *DDP,
             "method=minilm_v1,minilm_v2", "trainer.max_steps=2", f"hydra.sweep.dir={out}"],
            workdir, cache_dir, env=_env(cache_dir),
        )
    )  # fmt: skip
    return out


def test_each_sweep_job_runs_once_on_every_rank_with_its_own_config(ddp_sweep, workdir):
    jobs = sorted(p for p in ddp_sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2, jobs
    keys, methods = set(), []
    for job in jobs:
        rank0, rank1 = (
            _config_key(job / "distill.log", 0),
            _config_key(job / "distill_rank1.log", 1),
        )
        assert rank0 == rank1, job  # both ranks resolved the same config
        keys.add(rank0)
        summary = json.loads((job / "summary.json").read_text())
        methods.append(summary["method"])
        assert summary["steps"] == 2 and summary["global_batch_size"] == 8
        assert (job / ".hydra" / "overrides.yaml").is_file()
        assert (job / "distill_rank1.log").read_text().count("rank 1 of 2") == 1
    assert len(keys) == 2
    assert sorted(methods) == ["minilm_v1", "minilm_v2"]
    # no rank started a sweep or a run of its own elsewhere
    assert not (workdir / "multirun").exists() and not (workdir / "outputs").exists()


# --- the command of a rank, and the reset between jobs (in-process) -------------------------------


def test_a_rank_runs_only_its_job_with_the_jobs_overrides(tmp_path, cache_dir):
    from cli_helpers import compose_distill
    from hydra.conf import ConfigSourceInfo
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lmdistill.distributed import rank_command

    cfg = compose_distill(["method=minilm_v1"])
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["method=minilm_v1", "data.paths=[/a b/c.txt]"]
        cfg.hydra.overrides.hydra = ["hydra.mode=MULTIRUN", "hydra/launcher=ray_gpus",
                                     "hydra.sweep.dir=/sweeps/1", "hydra.verbose=true"]  # fmt: skip
        cfg.hydra.job.name = "distill"  # as in a real run (compose says "app")
        cfg.hydra.runtime.output_dir = "/sweeps/1/0_method=minilm_v1"
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.runtime.config_sources.append(
            ConfigSourceInfo(path="/my/confs", schema="file", provider="command-line")
        )
    HydraConfig.instance().set_config(cfg)
    command, cwd = rank_command(1, "lmdistill.distill")
    assert command[:3] == [sys.executable, "-m", "lmdistill.distill"]
    assert command[3:7] == ["--config-name", "distill", "--config-dir", "/my/confs"]
    assert "-m" not in command[3:] and "--multirun" not in command
    assert command[7:] == [
        "hydra.verbose=true",  # the job's own Hydra settings pass; the sweep's do not
        "method=minilm_v1",
        "data.paths=[/a b/c.txt]",
        'hydra.run.dir="/sweeps/1/0_method=minilm_v1"',
        "hydra.output_subdir=null",
        "hydra.job.name=distill_rank1",
    ]
    assert cwd == str(tmp_path)


def test_job_scope_restores_the_environment(monkeypatch):
    import os

    from lmdistill.distributed import job_scope

    monkeypatch.setenv("KEEP", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with job_scope("lmdistill.finetune"):
        assert os.environ["LMDISTILL_ENTRY_MODULE"] == "lmdistill.finetune"
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", MASTER_PORT="1234", KEEP="2")
    assert "LOCAL_RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert "MASTER_PORT" not in os.environ and "LMDISTILL_ENTRY_MODULE" not in os.environ
    assert os.environ["KEEP"] == "1"


def test_ranks_that_torchrun_or_slurm_start_log_to_their_own_file(tmp_path, monkeypatch):
    """The log file of the composed Hydra config: <job>.log for rank 0, <job>_rank<r>.log for a
    rank r > 0 that torchrun (RANK) or SLURM (SLURM_PROCID) started; the ranks lmdistill
    launches name themselves (hydra.job.name=<job>_rank<r>) and get no second suffix."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()

    def log_file(env: dict, job: str = "distill") -> str:
        for name in ("RANK", "SLURM_PROCID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("distill", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.job.name = job
        handler = OmegaConf.to_container(cfg.hydra.job_logging, resolve=True)["handlers"]["file"]
        return Path(handler["filename"]).name

    assert log_file({}) == "distill.log"
    assert log_file({"RANK": "0"}) == "distill.log"
    assert log_file({"RANK": "3"}) == "distill_rank3.log"
    assert log_file({"SLURM_PROCID": "1"}) == "distill_rank1.log"
    assert log_file({"RANK": "1"}, job="distill_rank1") == "distill_rank1.log"


def test_teacher_assistant_runs_both_stages_in_one_ddp_job(workdir, cache_dir):
    """Both stages train in one fit of the job's process group (parameters of the idle stage
    get no gradient: DDP finds them unused); the ranks Lightning launches take rank 0's plan."""
    out = workdir / "ta"
    shape = [
        "student.num_hidden_layers=1",
        "student.hidden_size=16",
        "student.intermediate_size=32",
    ]
    check_ok(
        run_cli(
            [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", *DDP, "assistant=default", *shape,
             "assistant.max_steps=2", "trainer.max_steps=2", f"hydra.run.dir={out}"],
            workdir, cache_dir, env=_env(cache_dir), timeout=480,  # 2 processes
        )
    )  # fmt: skip
    ranks = [(out / name).read_text() for name in ("distill.log", "distill_rank1.log")]
    fits = [re.findall(rf"rank {r} of 2: config (\w+)", log) for r, log in enumerate(ranks)]
    assert fits[0] == fits[1] and len(fits[0]) == 1  # one fit, both stages, on both ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_batch_size"] == 8 and summary["assistant"]["reused"] is False
    assert summary["steps"] == 2 and summary["assistant"]["summary"]["steps"] == 2
