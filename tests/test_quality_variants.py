"""benchmarks/quality.py --compare embeddings: the re-initialised teachers change exactly their parts."""

from __future__ import annotations

import importlib.util
import json
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
