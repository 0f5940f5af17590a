"""benchmarks/quality.py: the re-initialised teachers of --compare embeddings change exactly their
parts; --parallel runs each fine-tune after its distillation, at most N steps at once."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the tiny teacher has 2 layers: its last is encoder.layer.1
REINIT = {
    "teacher_words_reinit": ("embeddings.word_embeddings.",),
    "teacher_top_reinit": (
        "encoder.layer.1.attention.output.",
        "encoder.layer.1.intermediate.",
        "encoder.layer.1.output.",
        "pooler.",
    ),
}


@pytest.mark.parametrize("key", sorted(REINIT))
def test_variant_reinitialises_exactly_its_parts(key, quality, tiny_teacher_dir, tmp_path):
    out = tmp_path / key
    quality.make_variant(key, Path(tiny_teacher_dir), out, seed=3)
    before = load_file(next(Path(tiny_teacher_dir).glob("*.safetensors")))
    after = load_file(out / "model.safetensors")
    assert after.keys() == before.keys()
    std = json.loads((out / "config.json").read_text())["initializer_range"]
    changed = [k for k in before if k.startswith(REINIT[key])]
    assert changed
    for name, old in before.items():
        new = after[name]
        if name not in changed:
            assert torch.equal(new, old), name
        elif name.endswith("LayerNorm.weight"):
            assert torch.equal(new, torch.ones_like(old)), name
        elif name.endswith("bias"):
            assert torch.equal(new, torch.zeros_like(old)), name
        else:  # BERT init: N(0, initializer_range), the padding row of the words zero
            assert not torch.equal(new, old) and abs(new.std().item() - std) < 0.2 * std, name
    if key == "teacher_words_reinit":
        pad = json.loads((out / "config.json").read_text())["pad_token_id"]
        assert torch.count_nonzero(after["embeddings.word_embeddings.weight"][pad]) == 0
    assert (
        "re-initialised" in json.loads((out / "lmdistill_provenance.json").read_text())["variant"]
    )


class FakeBench:
    """Records when each step starts and ends; `distill("a")` can wait for a step to start."""

    def __init__(self, wait_for: str | None = None, fail: str | None = None):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []  # (start | end, step)
        self.running = self.most_running = 0
        self.started = {}  # step: threading.Event
        self.wait_for, self.fail = wait_for, fail

    def _step(self, name: str) -> None:
        with self.lock:
            self.events.append(("start", name))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.started.setdefault(name, threading.Event()).set()
        try:
            if name == "distill a" and self.wait_for:
                with self.lock:
                    event = self.started.setdefault(self.wait_for, threading.Event())
                assert event.wait(timeout=30), f"{self.wait_for} did not run beside {name}"
            if name == self.fail:
                raise SystemExit(f"{name} failed")
            time.sleep(0.05)
        finally:
            with self.lock:
                self.running -= 1
                self.events.append(("end", name))

    def distill(self, key: str) -> None:
        self._step(f"distill {key}")

    def finetune(self, row: str, model: str, init: str) -> None:
        self._step(f"finetune {row}")


ROWS = {  # row: (label, model, init, the distillation it needs)
    "teacher": ("teacher", "t", "pretrained", None),
    "a": ("a", "a/student", "pretrained", "a"),
    "random_init": ("random", "a/student", "random", "a"),
    "b": ("b", "b/student", "pretrained", "b"),
}


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_each_fine_tune_runs_once_after_its_distillation(quality, parallel):
    # with 3 at once, the teacher's fine-tune runs beside the distillations (distill a waits for it)
    bench = FakeBench(wait_for="finetune teacher" if parallel == 3 else None)
    quality.run_steps(bench, ["a", "b"], ROWS, parallel)
    starts = [step for kind, step in bench.events if kind == "start"]
    assert sorted(starts) == sorted(["distill a", "distill b", *(f"finetune {r}" for r in ROWS)])
    for row, (*_, needs) in ROWS.items():
        if needs is not None:
            ended = bench.events.index(("end", f"distill {needs}"))
            assert bench.events.index(("start", f"finetune {row}")) > ended, row
    assert bench.most_running <= parallel
    if parallel == 1:
        assert starts[:2] == ["distill a", "distill b"]


def test_a_failed_distillation_stops_what_needs_it(quality):
    bench = FakeBench(fail="distill a")
    with pytest.raises(SystemExit, match="distill a failed"):
        quality.run_steps(bench, ["a", "b"], ROWS, 1)
    starts = {step for kind, step in bench.events if kind == "start"}
    assert "finetune a" not in starts and "finetune random_init" not in starts
