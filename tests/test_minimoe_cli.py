"""lmdistill-distill method=minimoe end to end: the real CLI on the tiny teacher and student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import TINY, check_ok, read_metrics, run_cli, step_figures, write_corpus

from lmdistill.resources import CONF_DIR


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("distill", overrides=overrides)


@pytest.mark.parametrize("preset,x,y", [(None, 1, 4), ("1x1", 1, 1), ("2x4", 2, 4), ("1x8", 1, 8)])
def test_moe_presets_compose(preset, x, y):
    cfg = _compose(["method=minimoe", *([f"moe={preset}"] if preset else [])])
    assert cfg.method._target_ == "lmdistill.methods.MiniMoE"
    assert (cfg.moe.attention_experts, cfg.moe.ffn_experts) == (x, y)
    assert (
        cfg.moe.balance_weight == 0.01 and cfg.moe.router_noise == 0.1 and cfg.moe.init == "carve"
    )
    assert cfg.method.relation_site is None  # null: the method's default, top_projection
    cfg = _compose(["method=minimoe", "moe.ffn_experts=3", "moe.init=independent"])
    assert cfg.student.moe.ffn_experts == 3 and cfg.student.moe.init == "independent"


RUN = ["method=minimoe", "moe=1x4", "trainer.max_steps=4"]  # router noise and dropout on


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, cache_dir) -> Path:
    """4 steps, the checkpoint of step 2 kept."""
    work = tmp_path_factory.mktemp("minimoe-cli")
    write_corpus(work / "corpus.txt")
    out = work / "run"
    check_ok(run_cli([*TINY, *RUN, f"data.paths=[{work / 'corpus.txt'}]",
                      "callbacks.model_checkpoint.every_n_train_steps=2",
                      "callbacks.model_checkpoint.save_top_k=-1",
                      "logger=[csv,tensorboard,wandb]", f"hydra.run.dir={out}"],
                     work, cache_dir))  # fmt: skip
    return out


def test_resume_continues_exactly(moe_run, cache_dir, tmp_path):
    """From step 2: the uninterrupted run's losses, balance loss and expert loads (the restored
    RNG draws the same router noise and dropout masks)."""
    out, work = tmp_path / "resumed", moe_run.parent
    step2 = moe_run / "checkpoints" / "epoch=0-step=2.ckpt"
    check_ok(run_cli([*TINY, *RUN, f"data.paths=[{work / 'corpus.txt'}]", f"ckpt_path='{step2}'",
                      f"hydra.run.dir={out}"], work, cache_dir))  # fmt: skip
    full = step_figures(next(moe_run.rglob("metrics.csv")))
    resumed = step_figures(out / "logs" / "metrics.csv")
    assert sorted(resumed) == [2, 3] and "train/loss_balance" in resumed[2]
    assert any(k.startswith("moe/") for k in resumed[2])
    for step, figures in resumed.items():
        assert figures == pytest.approx(full[step], rel=1e-6, abs=0), step


def test_summary_reports_more_params_and_dense_gflops(moe_run, tiny_teacher_dir):
    from transformers import AutoConfig

    from lmdistill.models import build_student, encoder_gflops

    summary = json.loads((moe_run / "summary.json").read_text())
    assert summary["method"] == "minimoe" and summary["steps"] == 4
    assert summary["relation_site"] == "top_projection"
    s = summary["student"]
    dense = build_student(AutoConfig.from_pretrained(tiny_teacher_dir), num_hidden_layers=2,
                          hidden_size=32, num_attention_heads=4, intermediate_size=64)  # fmt: skip
    assert s["params"] > sum(p.numel() for p in dense.parameters())
    dense_gflops = encoder_gflops(2, 32, 64, 128)
    assert dense_gflops < s["gflops"] <= dense_gflops * 1.05  # within the routers' share


def test_export_loads_as_minimoe_without_the_relation_projection(moe_run):
    from safetensors import safe_open

    export = moe_run / "student"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "lmdistill-minimoe" and config["ffn_experts"] == 4
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".ffn.router." in k for k in keys)
    assert not any("relation_projection" in k for k in keys)


def test_routing_is_logged(moe_run):
    rows = read_metrics(next(moe_run.rglob("metrics.csv")))
    keys = set().union(*rows)
    assert {"moe/layer1_ffn/load_e0", "moe/layer2_ffn/entropy", "train/loss_balance"} <= keys
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_offline import history

    steps = sorted(int(r["step"]) for r in rows if "moe/layer1_ffn/entropy" in r)
    assert steps == [0, 1, 2, 3]  # every step (log_every_n_steps=1), 0-based as Lightning logs
    (events,) = moe_run.glob("tensorboard/events.out.tfevents*")
    tensorboard = EventAccumulator(str(events), size_guidance={"histograms": 0}).Reload()
    histograms = tensorboard.Histograms("moe/layer1_ffn/experts")
    assert [h.step for h in histograms] == steps  # beside the scalars, not a step later
    (run_file,) = moe_run.glob("wandb/offline-run-*/run-*.wandb")
    tables = {step for key, step in history(run_file) if key.startswith("moe/expert_load/")}
    assert sorted(tables) == steps


def test_exported_moe_student_fine_tunes_on_glue(moe_run, cache_dir, tmp_path, monkeypatch):
    """lmdistill-finetune takes a MiniMoE export like any student: routed layers, a new head."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "glue"))
    from glue_files import write_glue

    write_glue(tmp_path / "glue", rows=12)
    out = tmp_path / "rte"
    check_ok(run_cli(["task=rte", f"model={moe_run / 'student'}", "epochs=1", "batch_size=4",
                      f"data.glue_dir={tmp_path / 'glue'}", "trainer.enable_progress_bar=false",
                      f"hydra.run.dir={out}"],
                     tmp_path, cache_dir, module="lmdistill.finetune", timeout=180))  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "rte" and list(results["metrics"]) == ["accuracy"]
    assert results["model_shape"]["num_hidden_layers"] == 2
