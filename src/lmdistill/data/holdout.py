"""Which documents are held out for validation (the batches made of them: validation.py).

Held out from the training corpus (`data.val_fraction` f): document n of the corpus stream
(numbered from 0 in stream order, as everywhere in `dataset.py`) when n % K == 0, K = round(1/f).
Training streams skip those documents (the token cache still holds them: it holds every
document, whatever the split); the validation stream reads only them. With `data.val_paths`
those files are the validation corpus (K = 1: every document) and nothing of the training
corpus is held out (K = 0).
"""

from __future__ import annotations

from lmdistill.errors import UserError

PARTS = ("train", "validation")
DEFAULT_FRACTION = {"sample": 0.1}  # the embedded corpus is small (383 documents)
DEFAULT_FRACTION_OTHERS = 0.01
MAX_FRACTION = 0.5


def default_fraction(source: str) -> float:
    """The held-out share of a source when `data.val_fraction` is null."""
    return DEFAULT_FRACTION.get(source, DEFAULT_FRACTION_OTHERS)


def holdout_every(fraction: float) -> int:
    """K of a held-out fraction: documents n % K == 0 are held out."""
    if not 0 < fraction <= MAX_FRACTION:
        raise UserError(
            f"data.val_fraction={fraction} is not in (0, {MAX_FRACTION}]; hold out a share of "
            "the documents such as 0.01, give data.val_paths, or set data.val_batches=0"
        )
    return max(2, round(1 / fraction))


def is_selected(n: int, every: int, part: str) -> bool:
    """Whether document n belongs to `part` ("train" or "validation") when every `every`-th
    document is held out (`every` 0: none; 1: all)."""
    held_out = every > 0 and n % every == 0
    return held_out if part == "validation" else not held_out
