"""Sentences of one document (token ids) to segment pairs (docs/methods.md section 9).

* Target length: `max_tokens` (= max_seq_length minus the template's special tokens), or with
  probability `short_seq_prob` uniform in [2, max_tokens]; drawn afresh for every chunk.
* Consecutive sentences are accumulated until the target is reached; a sentence longer than
  `max_tokens` is first cut into pieces of `max_tokens` tokens (so no text is lost to one huge
  "sentence"). A last chunk of fewer than 2 tokens is merged into the chunk before it.
* A chunk is split at a random sentence boundary into A and B (a single-sentence chunk at a random
  token position): B is always the true continuation of A, never another document.
* The longer segment is trimmed, from the front or the back at random (as BERT), until the pair
  fits. A document of fewer than 2 tokens yields nothing.

`PairTemplate` reads the tokenizer's own pair template (`[CLS] A [SEP] B [SEP]` for BERT,
`<s> A </s></s> B </s>` for RoBERTa) from its post-processor once, so a pair is just list
concatenation afterwards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def plain_backend(tokenizer):
    """A copy of the fast tokenizer's backend with padding and truncation switched off."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens and token types around segments A and B."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    type_a: int
    type_b: int

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PairTemplate:
        """Encode a pair with the fast tokenizer's own template and read where the specials go."""
        backend = plain_backend(tokenizer)
        merged = backend.encode("a b", "c d", add_special_tokens=True)
        ids, types, seq = merged.ids, merged.type_ids, merged.sequence_ids
        pos_a = [i for i, s in enumerate(seq) if s == 0]
        pos_b = [i for i, s in enumerate(seq) if s == 1]
        first_a, last_a, first_b, last_b = pos_a[0], pos_a[-1], pos_b[0], pos_b[-1]
        return cls(
            prefix=tuple(ids[:first_a]),
            middle=tuple(ids[last_a + 1 : first_b]),
            suffix=tuple(ids[last_b + 1 :]),
            prefix_types=tuple(types[:first_a]),
            middle_types=tuple(types[last_a + 1 : first_b]),
            suffix_types=tuple(types[last_b + 1 :]),
            type_a=types[first_a],
            type_b=types[first_b],
        )

    def input_ids(self, a: list[int], b: list[int]) -> list[int]:
        return [*self.prefix, *a, *self.middle, *b, *self.suffix]

    def token_type_ids(self, len_a: int, len_b: int) -> list[int]:
        return [
            *self.prefix_types,
            *([self.type_a] * len_a),
            *self.middle_types,
            *([self.type_b] * len_b),
            *self.suffix_types,
        ]


def _target(rng: random.Random, max_tokens: int, short_seq_prob: float) -> int:
    if short_seq_prob > 0 and rng.random() < short_seq_prob:
        return rng.randint(2, max_tokens)
    return max_tokens


def _chunks(sentences: list[list[int]], rng: random.Random, max_tokens: int, short_seq_prob: float):
    pieces = []
    for sent in sentences:
        if len(sent) > max_tokens:
            pieces.extend(sent[i : i + max_tokens] for i in range(0, len(sent), max_tokens))
        elif sent:
            pieces.append(sent)
    chunks: list[list[list[int]]] = []
    current: list[list[int]] = []
    length = 0
    target = _target(rng, max_tokens, short_seq_prob)
    for piece in pieces:
        current.append(piece)
        length += len(piece)
        if length >= target:
            chunks.append(current)
            current, length = [], 0
            target = _target(rng, max_tokens, short_seq_prob)
    if current:
        chunks.append(current)
    if len(chunks) > 1 and sum(len(p) for p in chunks[-1]) < 2:
        chunks[-2].extend(chunks.pop())
    return chunks


def _trim(a: list[int], b: list[int], rng: random.Random, max_tokens: int) -> None:
    """Trim the longer segment, at the front or the back at random (as BERT), until the pair fits.

    Counts the cuts first (one draw per token, as deleting one token at a time would) and slices
    once.
    """
    len_a, len_b = len(a), len(b)
    cuts = [0, 0, 0, 0]  # front of A, back of A, front of B, back of B
    while len_a + len_b > max_tokens:
        back = rng.random() >= 0.5
        if len_a > len_b:
            cuts[back] += 1
            len_a -= 1
        else:
            cuts[2 + back] += 1
            len_b -= 1
    if cuts[0] or cuts[1]:
        a[:] = a[cuts[0] : len(a) - cuts[1]]
    if cuts[2] or cuts[3]:
        b[:] = b[cuts[2] : len(b) - cuts[3]]


def build_pairs(
    sentences: list[list[int]], rng: random.Random, max_tokens: int, short_seq_prob: float
) -> list[tuple[list[int], list[int]]]:
    """Segment pairs (A, B) of one document, in document order; each fits `max_tokens`."""
    pairs = []
    for chunk in _chunks(sentences, rng, max_tokens, short_seq_prob):
        if len(chunk) >= 2:
            cut = rng.randint(1, len(chunk) - 1)
            a = [t for s in chunk[:cut] for t in s]
            b = [t for s in chunk[cut:] for t in s]
        else:
            tokens = chunk[0]
            if len(tokens) < 2:
                continue  # only possible for a one-token document
            cut = rng.randint(1, len(tokens) - 1)
            a, b = list(tokens[:cut]), list(tokens[cut:])
        _trim(a, b, rng, max_tokens)
        pairs.append((a, b))
    return pairs
