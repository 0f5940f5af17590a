"""The fixed validation batches, made of the held-out documents (holdout.py says which).

The segment pairs of the held-out documents in document order (no shuffling), drawn with a fixed
seed (`VALIDATION_SEED`, not the run's seed), so every run on the same corpus, tokenizer and
`max_seq_length` validates on exactly the same batches, every time: full batches of
`data.batch_size` pairs except perhaps the last. Every DDP rank builds the same list and
evaluates a disjoint share of it: batch i goes to rank i % W, and the count is rounded up to a
multiple of W (equal counts per rank: Lightning's mean over ranks is then the mean over batches).
"""

from __future__ import annotations

import itertools
import logging
import math

import torch

from lmdistill.data.dataset import SegmentPairStream, collate_pairs
from lmdistill.errors import UserError

log = logging.getLogger("lmdistill")

VALIDATION_SEED = 0  # the pairs' lengths and split points: the same whatever the run's seed


def batches_for_ranks(requested: int, world_size: int) -> int:
    """The validation batches of all ranks: `requested` rounded up to a multiple of the ranks."""
    return math.ceil(requested / world_size) * world_size


def build_batches(
    stream: SegmentPairStream, batch_size: int, count: int, pad_id: int, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Up to `count` batches ([B, L] int64 tensors) of the stream's first pairs.

    Fewer where the held-out text is short (a warning; the count stays a multiple of
    `world_size`); none at all is a `UserError`.
    """
    pairs = list(itertools.islice(iter(stream), count * batch_size))
    batches = [
        collate_pairs(pairs[i : i + batch_size], pad_id) for i in range(0, len(pairs), batch_size)
    ]
    usable = len(batches) // world_size * world_size
    if usable == 0:
        raise UserError(
            f"the held-out text gives {len(pairs)} validation pairs, {len(batches)} batch(es) "
            f"for {world_size} rank(s); raise data.val_fraction, give data.val_paths with more "
            "text, or set data.val_batches=0"
        )
    if usable < count:
        log.warning(
            "the held-out text gives %d validation batch(es) of the %d asked for "
            "(data.val_batches); raise data.val_fraction or give data.val_paths for more",
            usable, count,
        )  # fmt: skip
    return batches[:usable]


class FixedBatches:
    """The validation batches of one rank, the same ones every time.

    A plain iterable, not a DataLoader: iterating draws nothing from the global RNG (a
    DataLoader iterator would, and change the training's dropout), and Lightning injects no
    distributed sampler (the share is chosen here).
    """

    def __init__(self, batches: list[dict], rank: int = 0, world_size: int = 1):
        self.batches = batches[rank::world_size]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
