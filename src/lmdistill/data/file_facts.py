"""What the corpus checks and the token cache need of a local file, read once and remembered.

`file_facts(path, memo_dir)` gives the SHA-256 of the file's contents (the token cache's key)
and whether it is UTF-8 text. Reading a corpus takes seconds per GB, on every rank of every
run, so the facts are remembered under `memo_dir`, keyed by the file's identity: its device,
inode, size, modification and change times. Any write to the file, and any `utime` that could
restore its modification time, moves its change time: an unchanged identity means unchanged
contents.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
from typing import NamedTuple

CHUNK = 1 << 24  # bytes read at a time


class FileFacts(NamedTuple):
    sha256: str  # of the contents
    utf8_problem: str | None  # None for UTF-8 text; else e.g. "byte 0xe9 at offset 3"


def file_facts(path: str, memo_dir: str | None = None) -> FileFacts:
    """The facts of `path`, read from `memo_dir` where its identity is unchanged (else read from
    the file and remembered there; a memo that cannot be written is skipped)."""
    st = os.stat(path)
    identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    if memo_dir is None:
        return _read(path)
    real = os.path.realpath(path)
    name = hashlib.sha256(real.encode()).hexdigest()[:32]
    memo = os.path.join(memo_dir, f"{name}.json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(memo, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["identity"] == identity:
            return FileFacts(saved["sha256"], saved["utf8_problem"])
    facts = _read(path)  # identity taken before: a write during the read changes it
    with contextlib.suppress(OSError):
        os.makedirs(memo_dir, exist_ok=True)
        tmp = f"{memo}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"path": real, "identity": identity, **facts._asdict()}, f)
        os.replace(tmp, memo)  # readers see the old memo or the new one, never half of one
    return facts


def _read(path: str) -> FileFacts:
    """One pass over the file: its hash, and its first byte that is not UTF-8."""
    sha = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    problem, offset = None, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            if problem is None:
                pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    bad = err.object[err.start]
                    problem = f"byte {bad:#04x} at offset {offset - pending + err.start}"
            offset += len(chunk)
    if problem is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            problem = "it ends inside a character"
    return FileFacts(sha.hexdigest(), problem)
