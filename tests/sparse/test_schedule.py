"""The sparsity schedule: q, global ranking, hidden sizes; BERT-base counts from the issue."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.errors import UserError
from lmdistill.sparse.schedule import SUPPORTED, kept_hidden, plan_sparsity, prune_percent

BERT_BASE = (12, 12, 3072, 768)  # layers, heads, FFN width, hidden


def _bert_base_plan(sparsity, seed=0):
    layers, heads, neurons, d = BERT_BASE
    g = torch.Generator().manual_seed(seed)
    return plan_sparsity(
        torch.rand(layers, heads, generator=g),
        torch.rand(layers, neurons, generator=g),
        d,
        sparsity,
    )


@pytest.mark.parametrize(
    ("s", "q", "heads_pruned", "neurons_pruned", "hidden_kept"),
    [(90, 68, 98, 25068, 248), (99, 90, 130, 33178, 80)],
)
def test_bert_base_counts_of_the_issue(s, q, heads_pruned, neurons_pruned, hidden_kept):
    """The issue's figures: heads and neurons are *pruned* counts (of 144 and 36864), the hidden
    figure is the *kept* size (of 768); read all as "kept", heads and neurons would disagree."""
    plan = _bert_base_plan(s)
    assert plan.prune_percent == q
    assert plan.pruned_heads == heads_pruned == 144 - sum(plan.layer_heads)
    assert plan.pruned_neurons == neurons_pruned == 36864 - sum(plan.layer_intermediate)
    assert plan.hidden_size == hidden_kept
    assert (sum(plan.layer_heads), sum(plan.layer_intermediate)) == (
        {90: (46, 11796), 99: (14, 3686)}[s]
    )


def test_prune_percent_of_every_supported_sparsity():
    expected = {0: 0, 10: 5, 20: 11, 30: 16, 40: 23, 50: 29, 60: 37, 70: 45, 80: 55, 85: 61,
                90: 68, 95: 78, 98: 86, 99: 90}  # fmt: skip
    assert {s: prune_percent(s) for s in SUPPORTED} == expected
    for s in SUPPORTED:  # independent: the formula in floating point
        assert prune_percent(s) == 100 - int(math.floor(100 * math.sqrt(1 - s / 100) + 0.5))


def test_hidden_sizes_are_multiples_of_eight():
    for s in SUPPORTED:
        q = prune_percent(s)
        for d in (32, 384, 768, 1024):
            kept = kept_hidden(d, q)
            assert kept % 8 == 0 and 8 <= kept <= d
            assert (
                kept == 8 or abs((d - kept) - round(q * d / 100)) <= 4
            )  # a nearest multiple of 8 to round(q% of d)
    assert kept_hidden(768, 0) == 768 and kept_hidden(32, 90) == 8


def test_global_ranking_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    heads, neurons = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    heads[1] *= 0.1  # layer 2 is unimportant: it loses most of its heads
    for s in (50, 90, 99):
        plan = plan_sparsity(heads, neurons, 32, s)
        q = prune_percent(s)
        for scores, kept, total in (
            (heads, plan.layer_heads, 12),
            (neurons, plan.layer_intermediate, 48),
        ):
            ranked = sorted(
                (scores[i, j].item(), i)
                for i in range(scores.shape[0])
                for j in range(scores.shape[1])
            )
            cut = [i for _, i in ranked[: round(q * total / 100)]]
            assert kept == [scores.shape[1] - cut.count(i) for i in range(scores.shape[0])]
    assert plan_sparsity(heads, neurons, 32, 90).layer_heads[1] == 0  # a layer may lose all heads


@pytest.mark.parametrize("bad", [100, -1, 150.0, True])
def test_bad_sparsity_is_a_user_error(bad):
    with pytest.raises(UserError, match="sparsity"):
        prune_percent(bad)
