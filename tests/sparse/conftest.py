"""Inputs of the sparsification tests (their tiny BERT models: sparse_nets.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from sparse_nets import TINY

sys.path.insert(0, str(Path(__file__).parents[1] / "glue"))  # glue_files.write_glue


@pytest.fixture
def batch():
    """[3, 12] ids with right padding; [CLS]=101-like id 1, [SEP] id 2 (special ids 0, 1, 2, 3)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, TINY["vocab_size"], (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    ids[:, 0] = 1
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types * mask}
