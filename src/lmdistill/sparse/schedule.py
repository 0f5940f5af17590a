"""The sparsity schedule: how many heads, neurons and hidden dims a target sparsity keeps.

For a target sparsity s% (docs/methods.md section 6), q = 100 - round(100 sqrt(1 - s/100)) is the
percentage pruned along each axis (pruning q% of the width along both axes of a weight matrix
removes about s% of its parameters): round(q% of all heads) and round(q% of all FFN neurons),
ranked globally by normalised importance (least important first), and round(q% of d) hidden
dims, rounded to a multiple of 8, in every layer.

The counts are exact (integer arithmetic; Python's `round`, half to even, as the original code).
For BERT-base (12 x 12 heads, 12 x 3072 neurons, d = 768): s=90 gives q=68, 98 of 144 heads and
25068 of 36864 neurons pruned, 248 hidden dims kept; s=99 gives q=90, 130 heads and 33178
neurons pruned, 80 hidden dims kept (`tests/sparse/test_schedule.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

from lmdistill.errors import UserError

# the sparsities the original work reports, and the configs in conf/sparsity/
SUPPORTED = (0, 10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95, 98, 99)


def prune_percent(sparsity: float) -> int:
    """q = 100 - round(100 sqrt(1 - s/100)): the percentage pruned along each axis."""
    if isinstance(sparsity, bool) or not 0 <= float(sparsity) < 100:
        raise UserError(
            f"sparsity {sparsity!r} is not a percentage in [0, 100); use e.g. sparsity=s90 "
            f"(configs: {', '.join(f's{s}' for s in SUPPORTED)})"
        )
    return 100 - round(100 * math.sqrt(1 - float(sparsity) / 100))


def percent_of(q: int, total: int) -> int:
    """round(q% of total), exactly (no float error near .5)."""
    return round(Fraction(q * total, 100))


def kept_hidden(hidden_size: int, q: int) -> int:
    """Hidden dims kept: d - (round(q% of d) rounded to a multiple of 8), at least 8 (or d)."""
    pruned = 8 * round(Fraction(percent_of(q, hidden_size), 8))
    return max(min(8, hidden_size), hidden_size - pruned)


@dataclass(frozen=True)
class SparsityPlan:
    """The shape a target sparsity leaves: per-layer head and neuron counts, one hidden size."""

    sparsity: float  # target s (percent)
    prune_percent: int  # q
    layer_heads: list[int]  # heads kept per layer
    layer_intermediate: list[int]  # FFN neurons kept per layer
    hidden_size: int  # hidden dims kept (every layer and the embeddings)
    pruned_heads: int  # of all heads
    pruned_neurons: int  # of all neurons

    def as_dict(self) -> dict:
        return asdict(self)


def _pruned_per_layer(scores: torch.Tensor, count: int) -> list[int]:
    """How many of each layer's units are among the `count` globally least important.

    scores: [layers, units]; ties are broken by position (lower layer, lower index first).
    """
    flat = scores.detach().double().flatten()  # [layers * units]
    order = torch.sort(flat, stable=True).indices[:count]  # ascending: least important first
    layers = torch.div(order, scores.shape[1], rounding_mode="floor")
    return torch.bincount(layers, minlength=scores.shape[0]).tolist()


def plan_sparsity(
    head_scores: torch.Tensor, neuron_scores: torch.Tensor, hidden_size: int, sparsity: float
) -> SparsityPlan:
    """The plan for target `sparsity` (percent) from normalised importance.

    head_scores: [layers, A]; neuron_scores: [layers, I] (per-layer L2-normalised, see
    `lmdistill.sparse.importance.normalize`); hidden_size: d.
    """
    q = prune_percent(sparsity)
    layers, heads = head_scores.shape
    neurons = neuron_scores.shape[1]
    n_heads = percent_of(q, layers * heads)
    n_neurons = percent_of(q, layers * neurons)
    head_cut = _pruned_per_layer(head_scores, n_heads)
    neuron_cut = _pruned_per_layer(neuron_scores, n_neurons)
    return SparsityPlan(
        sparsity=float(sparsity),
        prune_percent=q,
        layer_heads=[heads - c for c in head_cut],
        layer_intermediate=[neurons - c for c in neuron_cut],
        hidden_size=kept_hidden(hidden_size, q),
        pruned_heads=n_heads,
        pruned_neurons=n_neurons,
    )
