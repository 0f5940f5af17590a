"""Which sub-networks of a once-for-all family train at each step (docs/methods.md section 7).

`sandwich` (default): the largest and the smallest sub-network plus `random_subnets` distinct
others drawn at random; `all`: every sub-network of `layers` x `hidden` (the original code's only
mode). The draw is a pure function of (seed, step): no global RNG is read or advanced, so a
resumed run draws exactly what the uninterrupted run would have, every DDP rank draws the same
sub-networks, and the micro-batches of one optimizer step (pass the global step) share them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lmdistill.errors import UserError

SAMPLINGS = ("sandwich", "all")


def family_sizes(key: str, values, default: int) -> list[int]:
    """`ofa.layers` or `ofa.hidden` (`key`) as a list of ints (None: [default]), or a `UserError`:
    an empty list, a scalar or a non-integer would train another family than the one given."""
    if values is None:
        return [default]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise UserError(f"{key}={values!r} is not a list; write e.g. '{key}=[{values}]'")
    values = list(values)
    if not values:
        raise UserError(
            f"{key}=[] is empty; list at least one size, e.g. [6,4,3], or null for the student's"
        )
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int):
            raise UserError(f"{key}={values!r}: {x!r} is not an integer; list integers only")
    return values


def family(layers: Sequence[int], hidden: Sequence[int]) -> list[tuple[int, int]]:
    """Every (l, h) of `layers` x `hidden`, largest first (layers outer, hidden inner)."""
    if not layers or not hidden:
        raise UserError("ofa.layers and ofa.hidden need at least one value each; e.g. [6,4,3]")
    ls = sorted({int(x) for x in layers}, reverse=True)
    hs = sorted({int(x) for x in hidden}, reverse=True)
    return [(lay, hid) for lay in ls for hid in hs]


@dataclass(frozen=True)
class SubnetSampler:
    """The sub-networks (l, h) to train at a step: `sampler(step)`."""

    layers: tuple[int, ...]  # ofa.layers, e.g. (6, 4, 3)
    hidden: tuple[int, ...]  # ofa.hidden, e.g. (768, 512, 384, 256, 192)
    sampling: str = "sandwich"  # sandwich | all
    random_subnets: int | None = None  # sandwich: random ones besides the largest and smallest;
    # None: 2, or as many as the family has when it has fewer; all: None (none drawn)
    seed: int = 0  # with the step, decides the random draw

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "hidden", tuple(int(x) for x in self.hidden))
        if self.sampling not in SAMPLINGS:
            raise UserError(
                f"unknown ofa.sampling={self.sampling!r}; use one of {', '.join(SAMPLINGS)}"
            )
        if self.sampling == "all":
            if self.random_subnets is not None:
                raise UserError(
                    f"ofa.random_subnets={self.random_subnets!r} applies to ofa.sampling=sandwich; "
                    "ofa.sampling=all trains every sub-network: set ofa.random_subnets=null"
                )
            return
        others = len(self.family) - len(self.ends)
        if self.random_subnets is None:
            object.__setattr__(self, "random_subnets", min(2, others))
        k = self.random_subnets
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= others:
            raise UserError(
                f"ofa.random_subnets={k!r} must be an integer in 0..{others} (the sub-networks "
                "besides the largest and smallest); lower it, or use ofa.sampling=all"
            )

    @property
    def family(self) -> list[tuple[int, int]]:
        return family(self.layers, self.hidden)

    @property
    def ends(self) -> list[tuple[int, int]]:
        """The largest and the smallest sub-network (one entry when they coincide)."""
        fam = self.family
        return list(dict.fromkeys((fam[0], fam[-1])))

    @property
    def per_step(self) -> int:
        """Sub-networks trained per step."""
        if self.sampling == "all":
            return len(self.family)
        return len(self.ends) + self.random_subnets

    def __call__(self, step: int) -> list[tuple[int, int]]:
        """The sub-networks of global step `step`: largest, smallest, then the random ones
        (sandwich), or the whole family largest first (all)."""
        if self.sampling == "all":
            return self.family
        ends = self.ends
        others = [s for s in self.family if s not in ends]
        rng = random.Random(f"lmdistill-ofa:{int(self.seed)}:{int(step)}")  # sha512 of the string
        return ends + rng.sample(others, self.random_subnets)
