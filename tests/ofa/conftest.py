"""Tiny once-for-all super-nets: 3 layers x hidden 64, 16-dim heads, FFN 4h; family {3,2,1} x {64,48,32}."""

from __future__ import annotations

import pytest
import torch
from ofa_nets import HIDDEN, LAYERS, tiny_bert_config
from transformers import BertModel


@pytest.fixture
def dense_bert() -> BertModel:
    """A random dense 3 x 64 BERT (seeded), eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(tiny_bert_config())
        for p in model.parameters():  # non-trivial biases and LayerNorms too
            p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def supernet(dense_bert):
    from lmdistill.models.ofa_model import OFABertModel

    return OFABertModel.from_dense(dense_bert, LAYERS, HIDDEN).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """[3, 12] ids with right padding of different lengths, token types 0/1."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    types = torch.zeros(3, 12, dtype=torch.long)
    types[:, 6:] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}
