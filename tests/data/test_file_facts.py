"""file_facts: a file's SHA-256 and UTF-8 check in one read, remembered by the file's identity."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from lmdistill.data import file_facts as facts_module
from lmdistill.data.file_facts import file_facts


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("naïve café — 東京\n".encode(), None),
        (b"ok\n\xe9t\xe9\n", "byte 0xe9 at offset 3"),
        ("abc é".encode()[:-1], "it ends inside a character"),
    ],
    ids=["utf8", "latin1", "truncated"],
)
def test_hash_and_utf8_problem_in_chunks_that_split_characters(
    tmp_path, monkeypatch, data, problem
):
    monkeypatch.setattr(facts_module, "CHUNK", 3)  # multi-byte characters straddle chunks
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    facts = file_facts(str(path))
    assert facts.sha256 == hashlib.sha256(data).hexdigest()
    assert facts.utf8_problem == problem
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert problem is not None
    else:
        assert problem is None


def test_remembered_until_the_file_changes_even_with_its_size_and_mtime_restored(tmp_path):
    path, memo_dir = tmp_path / "corpus.txt", tmp_path / "memo"
    path.write_text("first text\n")
    first = file_facts(str(path), str(memo_dir))
    (memo,) = memo_dir.glob("*.json")
    saved = json.loads(memo.read_text())
    memo.write_text(json.dumps({**saved, "sha256": "remembered"}))
    assert file_facts(str(path), str(memo_dir)).sha256 == "remembered"  # not read again

    stat = path.stat()
    path.write_text("other text\n")  # same size, then the same modification time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    again = file_facts(str(path), str(memo_dir))
    assert again.sha256 == hashlib.sha256(b"other text\n").hexdigest() != first.sha256


def test_a_memo_that_cannot_be_written_is_skipped(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("text\n")
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    facts = file_facts(str(path), str(blocked / "memo"))
    assert facts.sha256 == hashlib.sha256(b"text\n").hexdigest()
