"""The super-net student builder: the teacher's vocabulary, init from the teacher, BERT only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ofa_nets import HIDDEN, LAYERS
from torch.testing import assert_close
from transformers import RobertaConfig

from lmdistill.errors import UserError
from lmdistill.models.ofa_model import OFABertModel
from lmdistill.models.ofa_student import ofa_student

SHAPE = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=256)


def test_builds_the_family_from_the_teacher(dense_bert, batch):
    teacher = SimpleNamespace(config=dense_bert.config, model=dense_bert)
    student = ofa_student(teacher, **SHAPE, init_from_teacher=True, ofa_layers=LAYERS,
                          ofa_hidden=HIDDEN, relation_site=None, moe={"ffn_experts": 1})  # fmt: skip
    assert isinstance(student, OFABertModel)
    assert student.config.family()[0] == (3, 64) and student.config.family()[-1] == (1, 32)
    assert student.config.vocab_size == dense_bert.config.vocab_size
    student.eval()
    expected = dense_bert(**batch).last_hidden_state
    assert_close(student(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_rejects_non_bert_teachers_and_experts(dense_bert):
    roberta = SimpleNamespace(config=RobertaConfig(**SHAPE), model=None)
    with pytest.raises(UserError, match="BERT teacher"):
        ofa_student(roberta, **SHAPE)
    teacher = SimpleNamespace(config=dense_bert.config, model=dense_bert)
    with pytest.raises(UserError, match="moe=1x1"):
        ofa_student(teacher, **SHAPE, moe={"attention_experts": 1, "ffn_experts": 4})
