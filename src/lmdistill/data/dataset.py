"""The per-worker stream of segment pairs, resumable mid-epoch (torchdata `Stateful`).

Sharding: global worker id g = rank * num_workers + worker_id, G = world_size * num_workers.
Document n (counted over the whole stream) goes to global worker n % G. This works for any
number of files or shards (nothing needs to divide by G) and every document goes to exactly one
worker per epoch.

Documents come from the token cache (token_cache.py) where a shard of it is complete: sentence
token ids, memory-mapped, only this worker's documents touched. Elsewhere (no cache, or a
streamed corpus not yet cached) every worker reads the text stream, splits and tokenizes only its
own documents and, with a cache, writes them as its part of each shard it saw from its start, so
the next epoch or run reads them. Either way a document gives the same sentence token ids, so
the pairs do not depend on where they came from.

Validation split (holdout.py): a stream is the `part` "train" or "validation" of the corpus;
with `holdout` K > 0, documents n % K == 0 are the validation part. A training worker still
tokenizes and caches its held-out documents (the cache holds every document) but does not yield
them; a validation stream yields only them and never writes the cache.

Randomness: each worker's `random.Random` is seeded from (seed, epoch, g), so the stream differs
per rank, per worker and per epoch and is reproducible given the seed.

State (`state_dict()`), plain ints/lists/dicts (loads with `torch.load(weights_only=True)`):
epoch, the number of the next document, a stream position known for a document at or before it
(the Hugging Face dataset's own `state_dict()`, a skip count, and that document's number), the
pairs of the current document not yet in the shuffle buffer, the shuffle buffer, the RNG state,
and whether the worker is done.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmdistill.data.holdout import PARTS, is_selected
from lmdistill.data.segments import PairTemplate, build_pairs, plain_backend
from lmdistill.data.sentences import split_sentences
from lmdistill.data.sources import StreamSpec, iter_documents
from lmdistill.data.token_cache import Document, ShardEnd, TokenCache, tokenize_sentences

# An item is one finished pair: [len_a, len_b, *input_ids], int32. The state carries the shuffle
# buffer packed into one bytes object: workers send their state with every batch, and 1000 lists
# of Python ints would cost more than building the batch.
Item = np.ndarray


def _pack(items: list[Item]) -> bytes:
    lengths = np.array([len(x) for x in items], dtype=np.int32)
    return np.concatenate([np.array([len(items)], dtype=np.int32), lengths, *items]).tobytes()


def _unpack(packed: bytes | list) -> list[Item]:
    if isinstance(packed, list):  # a state written before items were packed
        return [np.asarray(x, dtype=np.int32) for x in packed]
    flat = np.frombuffer(packed, dtype=np.int32)
    count = int(flat[0])
    lengths = flat[1 : 1 + count].tolist()
    ends = (1 + count + np.cumsum(lengths, dtype=np.int64)).tolist()
    return [flat[e - n : e].copy() for e, n in zip(ends, lengths, strict=True)]


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class SegmentPairStream(IterableDataset):
    """Yields `(input_ids, token_type_ids)` lists; see the module docstring."""

    def __init__(
        self,
        spec: StreamSpec,
        tokenizer: str,
        template: PairTemplate,
        document_format: str,
        text_field: str,
        max_seq_length: int,
        short_seq_prob: float,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        cache: TokenCache | None = None,
        holdout: int = 0,
        part: str = "train",
    ):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {part!r}")
        self.spec = spec
        self.tokenizer_path = tokenizer
        self.template = template
        self.document_format = document_format
        self.text_field = text_field
        self.max_tokens = max_seq_length - template.num_special
        self.short_seq_prob = short_seq_prob
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.cache = cache  # None: tokenize on the fly and keep nothing
        self.holdout = holdout  # K: documents n % K == 0 are held out (0: none)
        self.part = part  # "train" or "validation"
        self._writes_cache = part == "train"  # a validation stream sees only part of a shard
        self._resume: dict | None = None  # a loaded state, used by the next __iter__
        self._live: dict | None = None  # the state of the running iteration
        self._tokenizer = None  # loaded lazily, in the worker

    # ---- torchdata Stateful protocol -------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (drops any loaded state)."""
        self.epoch = epoch
        self._resume = None
        self._live = None

    def state_dict(self) -> dict[str, Any]:
        live = self._live
        if live is None:
            return dict(self._resume) if self._resume is not None else {"epoch": self.epoch}
        return {
            "epoch": live["epoch"],
            "hf_state": live["position"][0],
            "skip": live["position"][1],
            "position_doc": live["position_doc"],
            "doc_number": live["doc_number"],
            "pending": _pack(live["pending"]),
            "buffer": _pack(live["buffer"]),
            "rng": _rng_state(live["rng"]),
            "done": live["done"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = dict(state) if "doc_number" in state else None
        self._live = None

    # ---- documents -------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def _tokenize(self, text: str) -> Document:
        sentences = split_sentences(text)
        if not sentences:
            return []
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=False)
            self._tokenizer = plain_backend(tok)
        return tokenize_sentences(self._tokenizer, sentences)

    def _own_documents(self, live: dict, g: int, num_global: int):
        """This worker's documents from `live["doc_number"]` on: cached shards, else the stream."""
        while True:
            if self.cache is not None:
                size = self.cache.shard_documents
                reader = self.cache.open_shard(live["doc_number"] // size)
                if reader is not None:
                    for number, doc in reader.documents(live["doc_number"], g, num_global):
                        live["doc_number"] = number + 1
                        if is_selected(number, self.holdout, self.part):
                            yield doc
                    end = reader.end
                    live["doc_number"] = end.end_doc
                    if end.position is not None:
                        live["position"], live["position_doc"] = end.position, end.end_doc
                    if end.final:
                        return
                    continue
            finished = yield from self._streamed_documents(live, g, num_global)
            if finished:
                return

    def _streamed_documents(self, live: dict, g: int, num_global: int):
        """Read the text stream from a known position; tokenize (and cache) own documents.

        Returns True at the end of the stream, False where a cached shard begins.
        """
        cache, start = self.cache, live["doc_number"]
        size = cache.shard_documents if cache is not None else 0
        shard = start // size if cache is not None else 0
        # this shard is seen from its start
        writing = self._writes_cache and cache is not None and start % size == 0
        own: list[tuple[int, Document]] = []
        n = live["position_doc"]
        for text, next_position in iter_documents(
            self.spec, self.document_format, self.text_field, live["position"]
        ):
            if n >= start and cache is not None and n // size != shard:  # n opens a new shard
                if writing:
                    self._write(shard, g, num_global, own, ShardEnd(n, live["position"], False))
                own, shard, writing = [], n // size, self._writes_cache
                if cache.open_shard(shard) is not None:
                    return False
            live["position"], live["position_doc"] = next_position, n + 1
            if n >= start:
                live["doc_number"] = n + 1
                selected = is_selected(n, self.holdout, self.part)
                if n % num_global == g and (selected or writing):
                    doc = self._tokenize(text)
                    if writing:
                        own.append((n, doc))
                    if selected:
                        yield doc
            n += 1
        if writing:
            self._write(shard, g, num_global, own, ShardEnd(n, None, True))
        live["doc_number"] = n
        return True

    def _write(self, shard: int, g: int, num_global: int, own: list, end: ShardEnd) -> None:
        """Write this worker's part of a shard; a full or read-only disk only costs the cache."""
        if self.cache is None:  # an earlier write failed
            return
        try:
            self.cache.write_part(shard, g, num_global, own, end)
        except OSError as err:
            warnings.warn(
                f"token cache not written ({err}); this corpus stays uncached", stacklevel=2
            )
            self.cache = None

    # ---- pairs ------------------------------------------------------------------------------
    def _items(self, doc: Document, rng: random.Random) -> list[Item]:
        if not doc:
            return []
        pairs = build_pairs(doc, rng, self.max_tokens, self.short_seq_prob)
        template = self.template
        return [np.array([len(a), len(b), *template.input_ids(a, b)], np.int32) for a, b in pairs]

    def _output(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        """`(input_ids, token_type_ids)`: [L] int32 each."""
        types = self.template.token_type_ids(int(item[0]), int(item[1]))
        return item[2:], np.array(types, dtype=np.int32)

    def __iter__(self):
        g, num_global = self._worker()
        resume, self._resume = self._resume, None
        rng = random.Random(f"lmdistill/{self.seed}/{self.epoch}/{g}")
        live = {
            "epoch": self.epoch,
            "position": (None, 0),
            "position_doc": 0,
            "doc_number": 0,
            "pending": [],
            "buffer": [],
            "rng": rng,
            "done": False,
        }
        if resume is not None:
            doc_number = int(resume["doc_number"])
            live.update(
                epoch=int(resume["epoch"]),
                position=(resume["hf_state"], int(resume["skip"])),
                position_doc=int(resume.get("position_doc", doc_number)),
                doc_number=doc_number,
                pending=_unpack(resume["pending"]),
                buffer=_unpack(resume["buffer"]),
                done=bool(resume["done"]),
            )
            _set_rng_state(rng, resume["rng"])
        self._live = live
        if live["done"]:
            return
        pending, buffer = live["pending"], live["buffer"]
        size = self.shuffle_buffer

        def take_from_buffer() -> Item:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        documents = self._own_documents(live, g, num_global)
        while True:
            # Emit what the current document left, through the shuffle buffer.
            while pending:
                item = pending.pop(0)
                if size <= 0:
                    yield self._output(item)
                    continue
                buffer.append(item)
                if len(buffer) > size:
                    yield self._output(take_from_buffer())
            # Next document of this worker.
            doc = next(documents, None)
            if doc is None:
                break
            pending.extend(self._items(doc, rng))
        while buffer:
            item = take_from_buffer()
            if not buffer:
                live["done"] = True
            yield self._output(item)
        live["done"] = True


def collate_pairs(examples: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch: input_ids, token_type_ids, attention_mask."""
    length = max(len(ids) for ids, _ in examples)
    batch = len(examples)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)  # [B, L]
    token_type_ids = np.zeros((batch, length), dtype=np.int64)  # [B, L]
    attention_mask = np.zeros((batch, length), dtype=np.int64)  # [B, L]
    for i, (ids, types) in enumerate(examples):
        n = len(ids)
        input_ids[i, :n] = ids
        token_type_ids[i, :n] = types
        attention_mask[i, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type_ids),
        "attention_mask": torch.from_numpy(attention_mask),
    }
