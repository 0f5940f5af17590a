"""Tiny corpora of the data tests, written as text, JSON lines or Parquet (a module of its own:
test files import it by name)."""

from __future__ import annotations

import json
import random

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
