"""The token cache: sentence token ids of every document, tokenized once, memory-mapped.

Layout under `<cache_dir>/tokens/<key>/` (the key hashes everything that changes the content:
the tokenizer's full definition, the corpus files' contents (SHA-256, in order; read once and
remembered by file identity under `<cache_dir>/tokens/file-facts/`: `file_facts`) or the hub
dataset's name, the document format and text field, the sentence splitter's source and the
shard size):

    shard-000000/part-0-of-1/       documents 0 .. SHARD-1 of the stream, those with n % P == p
        tokens.npy                  [T] uint16 (uint32 for vocabularies over 65535) token ids
        sentence_ends.npy           [S] int64, cumulative: sentence i is tokens[ends[i-1]:ends[i]]
        document_ends.npy           [D] int64, cumulative sentence counts per document
        doc_numbers.npy             [D] int64, the documents' numbers in the stream
        meta.json                   end_doc (first document after the shard), the stream position
                                    of end_doc, final (the stream ends in this shard)
    complete.json                   written last by a full build (local corpora; a build
                                    that fails removes what it wrote)

A shard is usable when all P parts of one writer count P are present. Local corpora are built
whole by `build_cache` (one part per shard, under a file lock: one process builds, others wait).
Streamed corpora are filled as they stream: DataLoader worker p of P tokenizes its own documents
anyway and writes them as part p of each shard it saw from its start; a later epoch or run reads
the complete shards (whatever its own worker count) and streams only the rest. Every part is
written to a temporary directory and renamed into place, so readers never see half a part and
two writers of the same part (DDP ranks, sweep jobs) cannot corrupt it.

Hub datasets are keyed by path, config and split, not by revision: delete `<cache_dir>/tokens`
after the dataset changes on the hub (a local dataset directory is keyed by its files' contents). Size: 2 bytes per token (4 above 65535 word pieces) plus
8 per sentence, e.g. about 9 GB for English Wikipedia.

`max_seq_length` is not in the key on purpose: sentences are tokenized without truncation, and
pairs are cut from them when iterating, so one cache serves every sequence length. Nor is the
validation split (every document is cached) or the pair settings (applied when iterating).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lmdistill.data import sentences as _sentences_module
from lmdistill.data import sources as _sources_module
from lmdistill.data.file_facts import file_facts
from lmdistill.data.sentences import split_sentences
from lmdistill.data.sources import StreamSpec, iter_documents

FORMAT_VERSION = "1"
SHARD_DOCUMENTS = 4096  # documents per shard (the unit that is written and checked at once)

# Sentence token ids of one document: one list of ids per sentence.
Document = list


def _dir_files(root: str) -> list[str]:
    """The files under `root`, sorted, hidden files and directories left out."""
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(top, n) for n in names if not n.startswith(".")]
    return sorted(found)


def cache_key(
    spec: StreamSpec,
    document_format: str,
    text_field: str,
    tokenizer_json: str,
    shard_documents: int,
    memo_dir: str | None = None,
) -> str:
    """A hash of everything that changes the cached token ids (`memo_dir`: where `file_facts`
    remembers the files' hashes)."""
    # contents, not names or times: an edit keeps neither the cache nor its key
    files = None
    if spec.data_files is not None:
        files = [file_facts(f, memo_dir).sha256 for f in spec.data_files]
    elif os.path.isdir(spec.builder):  # a local dataset read as a hub one
        files = [
            (os.path.relpath(f, spec.builder), file_facts(f, memo_dir).sha256)
            for f in _dir_files(spec.builder)
        ]
    parts = {
        "version": FORMAT_VERSION,
        "spec": [spec.builder, files, spec.name, spec.split, spec.sample_by],
        "document_format": document_format,
        "text_field": text_field,
        "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "code": [file_facts(m.__file__).sha256 for m in (_sentences_module, _sources_module)],
        "shard_documents": shard_documents,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class ShardEnd:
    """Where a shard ends: the next document's number and its stream position."""

    end_doc: int
    position: tuple | None  # (hf_state, skip) of document end_doc, or None if not recorded
    final: bool


class ShardReader:
    """The documents of one complete shard, memory-mapped."""

    def __init__(self, part_dirs: list[str]):
        self.parts = []
        numbers = []
        for i, d in enumerate(part_dirs):
            arrays = {
                name: np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r")
                for name in ("tokens", "sentence_ends", "document_ends", "doc_numbers")
            }
            self.parts.append(arrays)
            count = len(arrays["doc_numbers"])
            rows = np.stack([arrays["doc_numbers"], np.full(count, i), np.arange(count)], 1)
            numbers.append(rows)  # [D_i, 3]: number, part, row
        with open(os.path.join(part_dirs[0], "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        position = meta["position"]
        self.end = ShardEnd(
            int(meta["end_doc"]), tuple(position) if position is not None else None, meta["final"]
        )
        index = np.concatenate(numbers) if numbers else np.zeros((0, 3), dtype=np.int64)
        self.index = index[np.argsort(index[:, 0], kind="stable")]  # [D, 3]: number, part, row

    def documents(self, start: int, g: int, num_global: int) -> Iterator[tuple[int, Document]]:
        """`(number, sentences)` of the documents n >= start with n % num_global == g."""
        numbers = self.index[:, 0]
        keep = (numbers >= start) & (numbers % num_global == g)
        for number, part, row in self.index[keep].tolist():
            yield number, self._document(part, row)

    def _document(self, part: int, row: int) -> Document:
        arrays = self.parts[part]
        doc_ends, sent_ends = arrays["document_ends"], arrays["sentence_ends"]
        s0 = int(doc_ends[row - 1]) if row else 0
        s1 = int(doc_ends[row])
        t0 = int(sent_ends[s0 - 1]) if s0 else 0
        ends = sent_ends[s0:s1].tolist()
        tokens = arrays["tokens"][t0 : ends[-1] if ends else t0].tolist()
        out, prev = [], t0
        for end in ends:
            out.append(tokens[prev - t0 : end - t0])
            prev = end
        return out


@dataclass(frozen=True)
class TokenCache:
    """A keyed cache directory (picklable: workers open it themselves)."""

    root: str
    shard_documents: int
    vocab_size: int

    def shard_dir(self, shard: int) -> str:
        return os.path.join(self.root, f"shard-{shard:06d}")

    @property
    def complete(self) -> bool:
        return os.path.exists(os.path.join(self.root, "complete.json"))

    def open_shard(self, shard: int) -> ShardReader | None:
        """The shard's reader if all parts of one writer count are present, else None."""
        try:
            names = os.listdir(self.shard_dir(shard))
        except FileNotFoundError:
            return None
        by_count: dict[int, dict[int, str]] = {}
        for name in names:
            fields = name.split("-")  # part-<p>-of-<P>
            if len(fields) == 4 and fields[0] == "part" and fields[2] == "of":
                by_count.setdefault(int(fields[3]), {})[int(fields[1])] = name
        for count, parts in sorted(by_count.items()):
            if len(parts) == count:
                return ShardReader(
                    [os.path.join(self.shard_dir(shard), parts[p]) for p in range(count)]
                )
        return None

    def write_part(
        self, shard: int, part: int, count: int, docs: list[tuple[int, Document]], end: ShardEnd
    ) -> None:
        """Write part `part` of `count` of a shard atomically (an existing part is kept)."""
        shard_dir = self.shard_dir(shard)
        target = os.path.join(shard_dir, f"part-{part}-of-{count}")
        if os.path.exists(target):
            return
        os.makedirs(shard_dir, exist_ok=True)
        dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        sentences = [s for _, doc in docs for s in doc]
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        tokens = np.fromiter(
            (t for s in sentences for t in s), dtype=dtype, count=int(lengths.sum())
        )
        arrays = {
            "tokens": tokens,  # [T]
            "sentence_ends": np.cumsum(lengths),  # [S]
            "document_ends": np.cumsum(np.array([len(d) for _, d in docs], dtype=np.int64)),
            "doc_numbers": np.array([n for n, _ in docs], dtype=np.int64),  # [D]
        }
        position = list(end.position) if end.position is not None else None
        if position is not None and json.loads(json.dumps(position)) != position:
            position = None  # a stream state JSON cannot hold exactly: continue from elsewhere
        tmp = tempfile.mkdtemp(dir=shard_dir, prefix=".tmp-")
        try:
            for name, array in arrays.items():
                np.save(os.path.join(tmp, f"{name}.npy"), array)
            meta = {"end_doc": end.end_doc, "position": position, "final": end.final}
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            os.rename(tmp, target)
        except OSError:
            if not os.path.exists(target):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename


def tokenize_sentences(backend, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the fast tokenizer's own threads)."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def build_cache(
    cache: TokenCache, spec: StreamSpec, document_format: str, text_field: str, backend
) -> None:
    """Tokenize the whole corpus into `cache` unless it is complete; one process at a time."""
    if cache.complete:
        return
    os.makedirs(os.path.dirname(cache.root), exist_ok=True)
    with open(cache.root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # others wait here, then find it complete
        if cache.complete:
            return
        os.makedirs(cache.root, exist_ok=True)
        n, shard, texts, position = 0, 0, [], None
        size = cache.shard_documents

        def flush(end: ShardEnd) -> None:
            per_doc = [split_sentences(t) for t in texts]
            flat = tokenize_sentences(backend, [s for doc in per_doc for s in doc])
            docs, i = [], 0
            for k, doc in enumerate(per_doc):
                docs.append((shard * size + k, flat[i : i + len(doc)]))
                i += len(doc)
            cache.write_part(shard, 0, 1, docs, end)

        try:
            for text, next_position in iter_documents(spec, document_format, text_field):
                if len(texts) == size:  # document n opens the next shard
                    flush(ShardEnd(n, position, False))
                    texts, shard = [], shard + 1
                texts.append(text)
                n, position = n + 1, next_position
            flush(ShardEnd(n, None, True))
        except Exception:
            shutil.rmtree(cache.root, ignore_errors=True)  # no half-built cache is left behind
            raise
        tmp = cache.root + f".complete-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"documents": n}, f)
        os.replace(tmp, os.path.join(cache.root, "complete.json"))
