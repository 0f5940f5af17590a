"""Mask gradients (the Taylor importances) against finite differences; accumulation; norms."""

from __future__ import annotations

import pytest
import torch
from sparse_nets import tiny_bert

from lmdistill.sparse.importance import (
    ImportanceSums,
    MLMSpec,
    accumulate,
    importance_order,
    mask_tokens,
    mlm_loss,
    normalize,
    relation_self_loss,
)
from lmdistill.sparse.masking import Masks, apply_masks

SPEC = MLMSpec(mask_token_id=3, vocab_size=120, special_ids=(0, 1, 2, 3), probability=0.5)

# (mask, index) entries checked by finite differences: every head, some neurons and hidden dims
ENTRIES = [("head", (i, j)) for i in range(2) for j in range(4)]
ENTRIES += [("neuron", (i, j)) for i in range(2) for j in (0, 17, 63)]
ENTRIES += [("hidden", (j,)) for j in (0, 5, 19, 31)]


def _finite_differences(loss_at, masks: Masks, eps: float, entries=ENTRIES) -> dict:
    """Central differences of loss_at(masks) at `entries` (masks not modified)."""
    out = {}
    for name, index in entries:
        values = []
        for sign in (1, -1):
            moved = Masks(*(t.detach().clone() for t in masks.tensors()))
            getattr(moved, name)[index] += sign * eps
            values.append(float(loss_at(moved)))
        out[(name, index)] = (values[0] - values[1]) / (2 * eps)
    return out


def _autograd(loss_at, masks: Masks, entries=ENTRIES) -> dict:
    leaf = Masks(*(t.detach().clone().requires_grad_(True) for t in masks.tensors()))
    grads = torch.autograd.grad(loss_at(leaf), leaf.tensors())
    named = dict(zip(("head", "neuron", "hidden"), grads, strict=True))
    return {(name, index): float(named[name][index]) for name, index in entries}


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mlm_mask_gradients_match_finite_differences(batch, family):
    model = tiny_bert(mlm=True, dtype=torch.float64, family=family)

    def loss_at(masks):
        with apply_masks(model, masks):
            return mlm_loss(model, batch, SPEC, torch.Generator().manual_seed(1))

    masks = Masks.ones(model.config, dtype=torch.float64)
    exact, numeric = _autograd(loss_at, masks), _finite_differences(loss_at, masks, 1e-6)
    for key in ENTRIES:
        assert abs(exact[key] - numeric[key]) <= 1e-6 + 1e-5 * abs(numeric[key]), key
    assert sum(abs(v) for v in exact.values()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_an_mlm_head_other_than_berts_is_scored_with_the_mlm_loss(tmp_path, batch, family):
    """loss=auto: RoBERTa's and XLM-R's `lm_head` is an MLM head as BERT's `cls` is."""
    from lmdistill.sparsify import load_model

    tiny_bert(mlm=True, family=family).save_pretrained(tmp_path)
    model, loss = load_model(str(tmp_path), "auto")
    assert loss == "mlm" and model.get_output_embeddings() is model.lm_head.decoder
    sums = ImportanceSums.zeros(model.config)
    accumulate(model, batch, sums, "mlm", seed=5, mlm=SPEC)
    assert all((t > 0).any() for t in (sums.head, sums.neuron, sums.hidden))


def test_relation_mask_gradients_match_finite_differences(batch):
    """The relation self-distillation loss with dropout on, same dropout masks at every point."""
    model = tiny_bert(dtype=torch.float64)

    def loss_at(masks):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            return relation_self_loss(model, batch, masks, relation_heads=4)

    masks = Masks.ones(model.config, dtype=torch.float64)
    entries = ENTRIES[::2]  # each point costs a relation loss: half of the entries
    exact = _autograd(loss_at, masks, entries)
    numeric = _finite_differences(loss_at, masks, 1e-3, entries)
    scale = max(abs(v) for v in numeric.values())
    for key in entries:  # relation_kl computes in float32: a looser tolerance
        assert abs(exact[key] - numeric[key]) <= 2e-3 * scale + 1e-5, key
    assert scale > 1e-4
    assert not model.training  # dropout was switched off again


def test_binary_masks_zero_what_they_mask(batch):
    """A zero hidden dim is 0 in the output and left out of the LayerNorm statistics."""
    model = tiny_bert()
    masks = Masks.ones(model.config)
    masks.hidden[5:] = 0
    with apply_masks(model, masks):
        hidden = model(**batch).last_hidden_state
    assert hidden[..., 5:].abs().max() == 0
    real = hidden[batch["attention_mask"].bool()][:, :5]  # [tokens, 5]
    weight = model.encoder.layer[-1].output.LayerNorm.weight[:5]
    bias = model.encoder.layer[-1].output.LayerNorm.bias[:5]
    normalized = (real - bias) / weight  # zero mean, unit variance over the 5 kept dims
    torch.testing.assert_close(normalized.mean(-1), torch.zeros(len(real)), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        normalized.var(-1, unbiased=False), torch.ones(len(real)), atol=1e-3, rtol=0
    )


def test_accumulate_sums_absolute_gradients_and_is_seeded(batch):
    model = tiny_bert(mlm=True)
    sums = ImportanceSums.zeros(model.config)
    for _ in range(2):
        accumulate(model, batch, sums, "mlm", seed=5, mlm=SPEC)
    assert sums.batches == 2 and len(sums.losses) == 2
    # independently: batch index 1 with its own generator and seed
    masks = Masks.ones(model.config, requires_grad=True)
    with apply_masks(model, masks):
        loss = mlm_loss(model, batch, SPEC, torch.Generator().manual_seed(5 * 1_000_003 + 1))
    grads = torch.autograd.grad(loss, masks.tensors())
    first = ImportanceSums.zeros(model.config)
    accumulate(model, batch, first, "mlm", seed=5, mlm=SPEC)
    for total, one, grad in zip(
        sums.mean(), (first.head, first.neuron, first.hidden), grads, strict=True
    ):
        torch.testing.assert_close(total * 2, one + grad.abs().double(), rtol=1e-5, atol=1e-9)
    relation = ImportanceSums.zeros(model.config)
    accumulate(tiny_bert(), batch, relation, "relation", seed=5, relation_heads=4)
    assert all((t > 0).all() for t in (relation.head, relation.neuron, relation.hidden))


def test_mlm_masking_is_80_10_10_on_real_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (64, 128), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 100:] = 0
    ids[:, 0] = 1
    spec = MLMSpec(3, 120, (0, 1, 2, 3))
    masked, labels = mask_tokens(ids, mask, spec, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 100:].any()
    assert abs(chosen.float().sum() / (64 * 99) - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    to_mask = (masked[chosen] == 3).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_normalize_and_order():
    scores = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    normed = normalize(scores)
    torch.testing.assert_close(normed, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]]))
    assert importance_order(normed).tolist() == [[1, 0, 2], [0, 1, 2]]
