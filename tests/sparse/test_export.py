"""Sparse students export as Hugging Face directories that the Auto classes load back."""

from __future__ import annotations

import json

import pytest
import torch
from sparse_nets import tiny_bert
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import lmdistill  # noqa: F401 - registers the lmdistill-sparse model type
from lmdistill.models.export import export_student
from lmdistill.models.sparse import (
    SparseBertForMaskedLM,
    SparseBertForSequenceClassification,
    SparseBertModel,
)
from lmdistill.sparse import SparsityPlan, slice_model

PLAN = SparsityPlan(90, 68, [0, 3], [20, 0], 16, 0, 0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_round_trip(tmp_path, batch, tiny_teacher_dir, family):
    student = slice_model(tiny_bert(family=family), PLAN)
    out = export_student(student, tiny_teacher_dir, tmp_path / "student", {"method": "test"})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmdistill-sparse"
    assert (config["layer_heads"], config["layer_intermediate"], config["hidden_size"]) == (
        [0, 3],
        [20, 0],
        16,
    )
    loaded = AutoModel.from_pretrained(out).eval()
    assert type(loaded) is SparseBertModel
    expected, got = student(**batch), loaded(**batch)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=0, rtol=0)
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert type(classifier) is SparseBertForSequenceClassification
    state = classifier.bert.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(state[name], value), name
    assert classifier(**batch).logits.shape == (3, 3)


def test_mlm_round_trip_keeps_the_head_tied(tmp_path, batch, tiny_teacher_dir):
    student = slice_model(tiny_bert(mlm=True), PLAN)
    out = export_student(student, tiny_teacher_dir, tmp_path / "mlm", {})
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(loaded) is SparseBertForMaskedLM
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(loaded(**batch).logits, student(**batch).logits, atol=0, rtol=0)


def test_summaries_count_each_layers_own_width():
    """summary.json and results.json: FLOPs of the layers as sliced, not of the widest layer."""
    from lmdistill.finetune import model_shape
    from lmdistill.models.describe import describe_student
    from lmdistill.models.flops import encoder_gflops

    student = slice_model(tiny_bert(), PLAN)
    c = student.config
    # by hand (2 per multiply-add), 128 tokens: layer 0 has no heads and 20 neurons, layer 1
    # 3 heads of size a and no FFN; d = 16
    d, a, n = 16, c.head_size, 128
    per_token = (2 * d * 20) + (4 * d * 3 * a + 2 * n * 3 * a)
    expected = 2.0 * n * per_token / 1e9
    described = describe_student(student)["gflops"]
    assert abs(described - expected) < 1e-12
    assert described < encoder_gflops(2, d, c.intermediate_size, 128)  # not the widest layers
    classifier = SparseBertForSequenceClassification(c)
    assert model_shape(classifier)["gflops"] == round(expected, 4)
