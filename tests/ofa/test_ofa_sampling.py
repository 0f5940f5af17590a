"""Sub-network sampling: sandwich and all, deterministic in (seed, step) without global RNG."""

from __future__ import annotations

import random

import pytest
import torch

from lmdistill.errors import UserError
from lmdistill.models.ofa_sampling import SubnetSampler, family

LAYERS, HIDDEN = (6, 4, 3), (768, 512, 384, 256, 192)


def test_family_is_the_product_largest_first():
    fam = family([3, 6, 4, 6], HIDDEN)
    assert len(fam) == 15 and len(set(fam)) == 15
    assert fam[0] == (6, 768) and fam[-1] == (3, 192)


def test_sandwich_is_largest_smallest_and_distinct_random_others():
    sampler = SubnetSampler(LAYERS, HIDDEN, seed=776)
    assert sampler.per_step == 4
    for step in range(200):
        subnets = sampler(step)
        assert subnets[:2] == [(6, 768), (3, 192)]
        assert len(subnets) == 4 and len(set(subnets)) == 4
        assert all(s in sampler.family for s in subnets)
    drawn = {s for step in range(200) for s in sampler(step)[2:]}
    assert drawn == set(sampler.family) - {(6, 768), (3, 192)}  # every other one comes up


def test_all_is_every_subnet_every_step():
    assert SubnetSampler(LAYERS, HIDDEN, "all").random_subnets is None  # none drawn (summary)
    sampler = SubnetSampler(LAYERS, HIDDEN, sampling="all")
    assert sampler.per_step == 15
    assert sampler(0) == sampler(12345) == family(LAYERS, HIDDEN)


def test_draw_depends_on_seed_and_step_only():
    a = SubnetSampler(LAYERS, HIDDEN, seed=3, random_subnets=3)
    random.seed(0)
    torch.manual_seed(0)
    first = [a(step) for step in range(50)]
    random.seed(99)
    torch.manual_seed(99)
    state = random.getstate()
    b = SubnetSampler(LAYERS, HIDDEN, seed=3, random_subnets=3)  # e.g. after a resume
    assert [b(step) for step in reversed(range(50))] == first[::-1]
    assert random.getstate() == state  # the global RNG is neither read nor advanced
    assert len({tuple(s) for s in first}) > 10  # steps differ
    other_seed = SubnetSampler(LAYERS, HIDDEN, seed=4, random_subnets=3)
    assert [other_seed(step) for step in range(50)] != first


def test_single_subnet_family_and_no_random_ones():
    assert SubnetSampler([6], [768], random_subnets=0)(7) == [(6, 768)]
    assert SubnetSampler([6], [768])(7) == [(6, 768)]  # the default: 2, or what there is
    assert SubnetSampler([6], [768, 384, 192]).random_subnets == 1
    assert SubnetSampler(LAYERS, HIDDEN).random_subnets == 2
    assert SubnetSampler(LAYERS, HIDDEN, random_subnets=0)(7) == [(6, 768), (3, 192)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"random_subnets": 14}, "0..13"),
        ({"random_subnets": -1}, "0..13"),
        ({"sampling": "random"}, "ofa.sampling"),
        ({"sampling": "all", "random_subnets": 1}, "ofa.random_subnets=1 .*sandwich.*null"),
        ({"sampling": "all", "random_subnets": 0}, "ofa.random_subnets=0 .*sandwich.*null"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, match):
    """Including a random draw's size for `all`, which draws none (it would be ignored)."""
    with pytest.raises(UserError, match=match) as err:
        SubnetSampler(LAYERS, HIDDEN, **kwargs)
    assert "\n" not in str(err.value)
