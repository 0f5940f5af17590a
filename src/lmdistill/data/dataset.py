"""The per-worker stream of segment pairs, resumable mid-epoch (torchdata `Stateful`).

Sharding: global worker id g = rank * num_workers + worker_id, G = world_size * num_workers.
Every worker reads the document stream and keeps document n (counted over the whole stream) iff
n % G == g; it tokenizes only its own documents. This works for any number of files or shards
(nothing needs to divide by G), every document goes to exactly one worker per epoch, and the
cost of reading (not tokenizing) the text G times is small next to tokenization.

Randomness: each worker's `random.Random` is seeded from (seed, epoch, g), so the stream differs
per rank, per worker and per epoch and is reproducible given the seed.

State (`state_dict()`), plain ints/lists/dicts (loads with `torch.load(weights_only=True)`):
epoch, the stream position of the next document (the Hugging Face dataset's own `state_dict()`
plus a document skip count), the number of the next document, the pairs of the current document
not yet in the shuffle buffer, the shuffle buffer, the RNG state, and whether the worker is done.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmdistill.data.segments import PairTemplate, build_pairs, plain_backend
from lmdistill.data.sentences import split_sentences
from lmdistill.data.sources import StreamSpec, iter_documents

# An item is one finished pair: [len_a, len_b, *input_ids] (ints only, cheap to copy and pickle).
Item = list


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
    ):
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
            "doc_number": live["doc_number"],
            "pending": list(live["pending"]),
            "buffer": list(live["buffer"]),
            "rng": _rng_state(live["rng"]),
            "done": live["done"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = dict(state) if "doc_number" in state else None
        self._live = None

    # ---- iteration -------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def _tokenize(self, sentences: list[str]) -> list[list[int]]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=False)
            self._tokenizer = plain_backend(tok)
        return [e.ids for e in self._tokenizer.encode_batch(sentences, add_special_tokens=False)]

    def _items(self, text: str, rng: random.Random) -> list[Item]:
        sentences = split_sentences(text)
        if not sentences:
            return []
        pairs = build_pairs(self._tokenize(sentences), rng, self.max_tokens, self.short_seq_prob)
        return [[len(a), len(b), *self.template.input_ids(a, b)] for a, b in pairs]

    def _output(self, item: Item) -> tuple[list[int], list[int]]:
        return item[2:], self.template.token_type_ids(item[0], item[1])

    def __iter__(self):
        g, num_global = self._worker()
        resume, self._resume = self._resume, None
        rng = random.Random(f"lmdistill/{self.seed}/{self.epoch}/{g}")
        live = {
            "epoch": self.epoch,
            "position": (None, 0),
            "doc_number": 0,
            "pending": [],
            "buffer": [],
            "rng": rng,
            "done": False,
        }
        if resume is not None:
            live.update(
                epoch=int(resume["epoch"]),
                position=(resume["hf_state"], int(resume["skip"])),
                doc_number=int(resume["doc_number"]),
                pending=[list(x) for x in resume["pending"]],
                buffer=[list(x) for x in resume["buffer"]],
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

        documents = iter_documents(
            self.spec.load(), self.document_format, self.text_field, live["position"]
        )
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
            try:
                text, next_position = next(documents)
            except StopIteration:
                break
            n = live["doc_number"]
            live["doc_number"] = n + 1
            live["position"] = next_position
            if n % num_global == g:
                pending.extend(self._items(text, rng))
        while buffer:
            item = take_from_buffer()
            if not buffer:
                live["done"] = True
            yield self._output(item)
        live["done"] = True


def collate_pairs(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch: input_ids, token_type_ids, attention_mask."""
    length = max(len(ids) for ids, _ in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # [B, L]
    token_type_ids = torch.zeros((batch, length), dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((batch, length), dtype=torch.long)  # [B, L]
    for i, (ids, types) in enumerate(examples):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        token_type_ids[i, :n] = torch.tensor(types, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
    }
