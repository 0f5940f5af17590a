"""lmdistill-distill end to end: the real CLI in subprocesses on the tiny teacher and student.

CLI runs are shared through module-scoped fixtures (one main run, a resume pair, one multirun,
one wheel install); config composition is checked in-process with Hydra's compose API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    TINY,
    check_ok,
    cli_env,
    compose_distill,
    read_metrics,
    resolved_config,
    run_cli,
    step_losses,
    write_corpus,
)

MAIN_STEPS = 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("cli")
    write_corpus(path / "corpus.txt")
    return path


@pytest.fixture(scope="module")
def main_run(workdir, cache_dir) -> Path:
    """30 steps at a high learning rate with the CSV and TensorBoard loggers, a checkpoint at
    every step (it must not take the step's figures from the logs)."""
    out = workdir / "main"
    check_ok(
        run_cli(
            [
                *TINY,
                f"data.paths=[{workdir / 'corpus.txt'}]",
                f"trainer.max_steps={MAIN_STEPS}",
                "optim.lr=3e-3",
                "logger=[csv,tensorboard]",
                "callbacks.model_checkpoint.every_n_train_steps=1",
                f"hydra.run.dir={out}",
            ],  # fmt: skip
            workdir,
            cache_dir,
        )
    )
    return out


@pytest.fixture(scope="module")
def summary(main_run) -> dict:
    return json.loads((main_run / "summary.json").read_text())


# --- 1. one run's outputs ------------------------------------------------------------------


def test_summary_has_the_contract_fields(summary, main_run):
    from transformers import AutoModel

    from lmdistill.models import encoder_gflops

    for key in ("method", "teacher", "student", "steps", "tokens_seen", "loss_first",
                "final_loss", "tokens_per_second", "export_dir"):  # fmt: skip
        assert key in summary, key
    assert summary["method"] == "minilm_v2"
    assert summary["steps"] == MAIN_STEPS
    assert summary["tokens_seen"] > 0
    assert summary["tokens_per_second"] > 0
    assert Path(summary["export_dir"]) == main_run / "student"
    shape = summary["student"]
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"]) == (
        2, 32, 4,
    )  # fmt: skip
    exported = AutoModel.from_pretrained(main_run / "student")
    assert shape["params"] == sum(p.numel() for p in exported.parameters())
    config = exported.config
    assert shape["gflops"] == pytest.approx(
        encoder_gflops(config.num_hidden_layers, config.hidden_size, config.intermediate_size, 128),
        rel=1e-9,
    )
    assert summary["teacher"]["name_or_path"].endswith("tiny-bert-v2")
    assert shape["init_from_teacher"] is False  # BERT init
    assert summary["relation_weights"] == {"qq": 1.0, "kk": 1.0, "vv": 1.0}


def test_tokens_seen_matches_the_logged_count(summary, main_run):
    rows = [r for r in read_metrics(main_run / "logs" / "metrics.csv") if "train/tokens_seen" in r]
    assert len(rows) == MAIN_STEPS
    assert rows[-1]["train/tokens_seen"] == summary["tokens_seen"]


def test_last_checkpoint_loads_safely(main_run):
    checkpoint = torch.load(main_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == MAIN_STEPS
    assert {"state_dict", "loops", "optimizer_states", "lr_schedulers"} <= checkpoint.keys()
    assert all(key.startswith("student.") for key in checkpoint["state_dict"])


def test_metrics_csv_has_per_step_columns(main_run):
    rows = read_metrics(main_run / "logs" / "metrics.csv")
    columns = set().union(*rows)
    for column in ("train/loss", "train/loss_qq", "train/loss_kk", "train/loss_vv",
                   "train/tokens_per_second", "train/global_batch_size"):  # fmt: skip
        steps = {int(r["step"]) for r in rows if column in r}
        timed = column != "train/tokens_per_second"  # step 0 includes start-up: not timed
        assert steps == set(range(0 if timed else 1, MAIN_STEPS)), column
    lr_columns = [c for c in columns if c.startswith("lr-")]
    assert lr_columns
    lrs = [r[lr_columns[0]] for r in rows if lr_columns[0] in r]
    assert len(lrs) == MAIN_STEPS and lrs[0] == pytest.approx(3e-3) and lrs[-1] < lrs[0]
    sizes = [r["train/global_batch_size"] for r in rows if "train/global_batch_size" in r]
    assert max(sizes) == 8.0 and sizes.count(8.0) > MAIN_STEPS // 2  # short at the corpus's end


def test_tensorboard_logger_writes_events(main_run):
    assert list((main_run / "tensorboard").rglob("events.out.tfevents.*"))


# --- 2. the export is the trained student ----------------------------------------------------


def test_export_equals_checkpointed_student(main_run):
    from transformers import AutoConfig, AutoModel

    exported = AutoModel.from_pretrained(main_run / "student").eval()
    state = torch.load(main_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weights = {k.removeprefix("student."): v for k, v in state.items()}
    rebuilt = AutoModel.from_config(AutoConfig.from_pretrained(main_run / "student"))
    rebuilt.load_state_dict(weights, strict=True)
    rebuilt.eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 5000, (3, 16), generator=generator)
    input_ids[:, 0] = 101
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    with torch.no_grad():
        a = exported(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        b = rebuilt(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the trained weights are not the initial ones: a fresh init with the same seed differs
    torch.manual_seed(776)
    fresh = AutoModel.from_config(rebuilt.config)
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(fresh.state_dict()[q], exported.state_dict()[q])


def test_export_tokenizer_round_trips(main_run, tiny_teacher_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(main_run / "student")
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    text = "the river bends slowly around the old mill."
    ids = tokenizer(text)["input_ids"]
    assert ids == teacher_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_export_provenance(main_run, workdir, cache_dir):
    provenance = json.loads((main_run / "student" / "lmdistill_provenance.json").read_text())
    assert provenance["teacher"].endswith("tiny-bert-v2")
    assert provenance["method"] == "lmdistill.methods.MiniLMv2"
    assert provenance["teacher_layer"] == 2
    assert provenance["relation_heads"] == 4
    assert provenance["relation_weights"] == {"qq": 1.0, "kk": 1.0, "vv": 1.0}
    assert provenance["init_from_teacher"] is False
    assert provenance["data"]["paths"] == [str(workdir / "corpus.txt")]
    # the text itself: the token cache key hashes the file's contents with the tokenizer
    assert provenance["data"]["files"] == [str(workdir / "corpus.txt")]
    assert (
        cache_dir / "data" / "tokens" / provenance["data"]["token_cache"] / "complete.json"
    ).exists()
    assert provenance["steps"] == MAIN_STEPS


# --- 3. the loss falls -------------------------------------------------------------------------


def test_loss_falls(summary):
    assert summary["final_loss"] < 0.8 * summary["loss_first"], summary


# --- 4. resume -----------------------------------------------------------------------------------

RESUME = [  # dropout stays on: the checkpoint restores the RNG, so dropout masks resume too
    "trainer.max_steps=6",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.model_checkpoint.save_top_k=-1",  # keep epoch=0-step=3.ckpt
]


@pytest.fixture(scope="module")
def resume_runs(workdir, cache_dir) -> tuple[Path, Path]:
    """C: 6 uninterrupted steps (checkpoint at step 3 kept); B: resumed from C's step 3.

    C also logs to W&B with WANDB_MODE unset: the wandb config must stay offline, never prompt.
    """
    corpus = f"data.paths=[{workdir / 'corpus.txt'}]"
    full, resumed = workdir / "resume_full", workdir / "resume_from3"
    check_ok(
        run_cli(
            [*TINY, corpus, *RESUME, "logger=[csv,wandb]", f"hydra.run.dir={full}"],
            workdir,
            cache_dir,
            env=cli_env(cache_dir, WANDB_MODE=None, WANDB_API_KEY=None),
        )
    )
    step3 = full / "checkpoints" / "epoch=0-step=3.ckpt"
    assert step3.is_file()
    check_ok(
        run_cli(
            [*TINY, corpus, *RESUME, f"ckpt_path='{step3}'", f"hydra.run.dir={resumed}"],
            workdir,
            cache_dir,
        )
    )
    return full, resumed


@pytest.fixture(scope="module")
def every_4_steps(workdir, cache_dir) -> Path:
    """The resume pair's uninterrupted run, logging every 4 steps."""
    out = workdir / "every_4_steps"
    args = [*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", *RESUME,
            "trainer.log_every_n_steps=4", f"hydra.run.dir={out}"]  # fmt: skip
    check_ok(run_cli(args, workdir, cache_dir))
    return out


def test_each_step_is_in_exactly_one_logged_interval(resume_runs, every_4_steps):
    """Rows at step 0 (the first step alone), at Lightning's logging step 3 and at the last step
    (the partial interval, once): each the mean loss of its steps, as logged one by one."""
    full, _ = resume_runs
    per_step = read_metrics(full / "logs" / "metrics.csv")
    loss = {int(r["step"]): r["train/loss"] for r in per_step if "train/loss" in r}
    seen = {int(r["step"]): r["train/tokens_seen"] for r in per_step if "train/tokens_seen" in r}
    rows = [r for r in read_metrics(every_4_steps / "logs" / "metrics.csv") if "train/loss" in r]
    assert [int(r["step"]) for r in rows] == [0, 3, 5]
    for row, steps in zip(rows, ([0], [1, 2, 3], [4, 5]), strict=True):
        expected = sum(loss[s] for s in steps) / len(steps)
        assert row["train/loss"] == pytest.approx(expected, rel=1e-5), row["step"]
        assert row["train/tokens_seen"] == seen[int(row["step"])]


def test_a_resume_inside_a_logging_interval_logs_the_steps_before_the_checkpoint(
    resume_runs, every_4_steps, workdir, cache_dir
):
    """every_4_steps' step-3 checkpoint falls inside its interval of steps 1-3, before steps 1
    and 2 were logged: the resumed run's first row holds them with its own first step."""
    resumed = workdir / "every_4_steps_resumed"
    step3 = every_4_steps / "checkpoints" / "epoch=0-step=3.ckpt"
    check_ok(run_cli([*TINY, f"data.paths=[{workdir / 'corpus.txt'}]", *RESUME,
                      "trainer.log_every_n_steps=4", f"ckpt_path='{step3}'",
                      f"hydra.run.dir={resumed}"], workdir, cache_dir))  # fmt: skip
    loss = step_losses(resume_runs[0] / "logs" / "metrics.csv")  # logged one by one
    before = [r for r in read_metrics(every_4_steps / "logs" / "metrics.csv")
              if "train/loss" in r and int(r["step"]) < 3]  # fmt: skip
    after = [r for r in read_metrics(resumed / "logs" / "metrics.csv") if "train/loss" in r]
    assert [int(r["step"]) for r in before + after] == [0, 3, 5]
    for row, steps in zip(before + after, ([0], [1, 2, 3], [4, 5]), strict=True):
        expected = sum(loss[s] for s in steps) / len(steps)
        assert row["train/loss"] == pytest.approx(expected, rel=1e-5), row["step"]


def test_resume_continues_exactly(resume_runs):
    full, resumed = resume_runs
    c = step_losses(full / "logs" / "metrics.csv")
    b = step_losses(resumed / "logs" / "metrics.csv")
    assert sorted(c) == list(range(6))
    assert sorted(b) == [3, 4, 5]  # steps 4..6, 0-based
    for step in (3, 4, 5):  # same data position, weights, optimizer and schedule: same losses
        assert b[step] == pytest.approx(c[step], rel=1e-5, abs=0), step
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["loss_first"] == pytest.approx(c[0], rel=1e-6)  # carried by the checkpoint
    # the last 10 steps' mean: the steps before the checkpoint are carried by it too
    assert summary["final_loss"] == pytest.approx(sum(c.values()) / 6, rel=1e-5)


def test_resume_at_an_epoch_boundary_continues_exactly(workdir, cache_dir):
    """A checkpoint after the last batch of an epoch: the resumed run starts the next epoch as
    the uninterrupted one did (same data, same dropout masks, same epoch numbers)."""
    corpus = f"data.paths=[{workdir / 'corpus.txt'}]"
    every_step = ["callbacks.model_checkpoint.every_n_train_steps=1",
                  "callbacks.model_checkpoint.save_top_k=-1"]  # fmt: skip
    full = workdir / "epochs_full"
    check_ok(run_cli([*TINY, corpus, "trainer.max_steps=14", *every_step,
                      f"hydra.run.dir={full}"], workdir, cache_dir))  # fmt: skip
    names = {p.name for p in (full / "checkpoints").glob("epoch=*.ckpt")}
    last_of_epoch0 = max((n for n in names if n.startswith("epoch=0-")),
                         key=lambda n: int(n.split("step=")[1][:-5]))  # fmt: skip
    boundary = int(last_of_epoch0.split("step=")[1][:-5])
    assert 1 < boundary < 13 and f"epoch=1-step={boundary + 1}.ckpt" in names
    resumed = workdir / "epochs_resumed"
    check_ok(run_cli([*TINY, corpus, "trainer.max_steps=14", *every_step,
                      f"ckpt_path='{full / 'checkpoints' / last_of_epoch0}'",
                      f"hydra.run.dir={resumed}"], workdir, cache_dir))  # fmt: skip
    c = step_losses(full / "logs" / "metrics.csv")
    b = step_losses(resumed / "logs" / "metrics.csv")
    assert sorted(b) == list(range(boundary, 14))
    for step in b:
        assert b[step] == pytest.approx(c[step], rel=1e-5, abs=0), step
    assert (resumed / "checkpoints" / f"epoch=1-step={boundary + 1}.ckpt").is_file()


def test_resume_keeps_tokens_seen(resume_runs):
    full, resumed = resume_runs
    c = json.loads((full / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert b["tokens_seen"] == c["tokens_seen"]


def test_wandb_without_wandb_mode_stays_offline(resume_runs):
    full, _ = resume_runs
    runs = list((full / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((full / "wandb").iterdir())
    assert not list((full / "wandb").glob("run-*"))  # no online run


# --- 5. multirun ---------------------------------------------------------------------------------


def test_multirun_gives_one_directory_per_job(tiny_sweep):
    jobs = sorted(p for p in tiny_sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(jobs) == 2, list(tiny_sweep.iterdir())
    methods = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        methods.append(summary["method"])
        assert summary["steps"] == 2
        assert Path(summary["export_dir"]) == job / "student"
        assert (job / "student" / "model.safetensors").is_file()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "logs" / "metrics.csv").is_file()
    assert sorted(methods) == ["minilm_v1", "minilm_v2"]
    v1 = next(j for j in jobs if "minilm_v1" in j.name)
    assert "train/loss_at" in set().union(*read_metrics(v1 / "logs" / "metrics.csv"))


# --- 7. config composition (in-process) ---------------------------------------------------------


def test_experiment_bert_large_l6(tmp_path, cache_dir):
    cfg = resolved_config(compose_distill(["experiment=minilm_v2_bert-large_L6"]), tmp_path)
    assert cfg["teacher"]["name_or_path"] == "google-bert/bert-large-uncased"
    assert cfg["teacher"]["layer"] == 21 and "teacher_layer" not in cfg["method"]  # one place
    assert cfg["method"]["relation_heads"] == 64
    assert cfg["method"]["_target_"] == "lmdistill.methods.MiniLMv2"
    assert (cfg["student"]["num_hidden_layers"], cfg["student"]["hidden_size"]) == (6, 384)
    assert cfg["optim"]["lr"] == 6e-4 and cfg["optim"]["betas"] == [0.9, 0.98]
    assert cfg["optim"]["warmup_steps"] == 4000
    assert cfg["trainer"]["precision"] == "16-mixed" and cfg["trainer"]["devices"] == 8
    assert cfg["trainer"]["max_steps"] == 400000
    assert cfg["data"]["hf_path"] == "wikimedia/wikipedia"
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 512  # global batch


def test_experiment_bert_base_l3(tmp_path, cache_dir):
    cfg = resolved_config(compose_distill(["experiment=minilm_v2_bert-base_L3"]), tmp_path)
    assert cfg["teacher"]["name_or_path"] == "google-bert/bert-base-uncased"
    assert cfg["teacher"]["layer"] is None and "teacher_layer" not in cfg["method"]
    assert cfg["method"]["relation_heads"] == 32
    assert (cfg["student"]["num_hidden_layers"], cfg["student"]["hidden_size"]) == (3, 384)
    assert cfg["optim"]["lr"] == 3e-4 and cfg["optim"]["eps"] == 1e-6
    assert cfg["optim"]["weight_decay"] == 0.01 and cfg["optim"]["warmup_ratio"] == 0.01
    assert cfg["trainer"]["gradient_clip_val"] == 5.0 and cfg["seed"] == 776
    assert cfg["trainer"]["precision"] == "16-mixed" and cfg["trainer"]["max_steps"] == 100000
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 1024


def test_defaultscompose_distill(tmp_path, cache_dir):
    cfg = resolved_config(compose_distill([]), tmp_path)
    assert cfg["method"]["_target_"] == "lmdistill.methods.MiniLMv2"
    assert cfg["data"]["source"] == "sample"
    assert Path(cfg["teacher"]["name_or_path"], "config.json").is_file()  # the offline teacher
    assert cfg["method"]["relation_heads"] == 32
    assert cfg["callbacks"]["model_checkpoint"]["dirpath"] == f"{tmp_path}/checkpoints"
    assert cfg["paths"]["cache_dir"] == str(cache_dir)


GROUPS = ("teacher", "student", "method", "data", "logger")


def _options(group: str) -> list[str]:
    from lmdistill.resources import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group, tmp_path, cache_dir):
    options = _options(group)
    assert len(options) >= 2
    for option in options:
        cfg = resolved_config(compose_distill([f"{group}={option}"]), tmp_path)
        assert cfg[group], (group, option)
        if group == "student":
            shape = cfg["student"]
            assert shape["hidden_size"] % shape["num_attention_heads"] == 0, option
        if group == "teacher":
            assert cfg["method"]["relation_heads"] == cfg["teacher"]["relation_heads"]
        if group == "logger":
            for logger in cfg["logger"].values():
                assert logger["save_dir"] == str(tmp_path)
            if option == "wandb":
                assert cfg["logger"]["wandb"]["mode"] in ("offline", os.environ.get("WANDB_MODE"))


# --- 9. a non-editable install ships its configs ---------------------------------------------


@pytest.mark.slow
def test_wheel_install_runs_outside_the_repo(tmp_path, workdir, cache_dir):
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # build from a copy: the repo's tree is left untouched
    for tree in ("src", "conf"):
        shutil.copytree(
            repo / tree, source / tree, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
        )
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(repo / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],  # fmt: skip
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("lmdistill-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "lmdistill/conf/distill.yaml" in archive.namelist()
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    # PYTHONPATH comes before site-packages, where the editable install's .pth adds the repo's src
    env = cli_env(cache_dir, PYTHONPATH=str(site))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import lmdistill.distill as d, lmdistill.resources as r; "
         "print(d.__file__); print(r.CONF_DIR)"],  # fmt: skip
        cwd=outside, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    module_file, conf_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(conf_dir).is_relative_to(site) and (Path(conf_dir) / "distill.yaml").is_file()
    out = outside / "run"
    check_ok(
        run_cli(
            [
                *TINY,
                f"data.paths=[{workdir / 'corpus.txt'}]",
                "trainer.max_steps=1",
                f"hydra.run.dir={out}",
            ],  # fmt: skip
            outside,
            cache_dir,
            env=env,
        )
    )
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / "student" / "config.json").is_file()
    overrides = (out / ".hydra" / "hydra.yaml").read_text()
    assert str(site) in overrides  # Hydra's config search path was the installed package
