"""Reordering keeps the function; slicing equals masking; FLOPs and parameters of sparse models."""

from __future__ import annotations

import pytest
import torch
from sparse_nets import TINY, random_orders, tiny_bert

from lmdistill.models.flops import encoder_gflops
from lmdistill.models.sparse import SparseBertConfig, SparseBertModel, sparse_gflops, sparse_params
from lmdistill.sparse import Masks, SparsityPlan, apply_masks, plan_sparsity, reorder_model
from lmdistill.sparse.slicing import slice_model

FAMILIES = ["bert", "roberta", "xlm-roberta"]


def test_reorder_preserves_the_encoder_up_to_the_hidden_permutation(batch):
    model = tiny_bert()
    before = model(**batch)
    heads, neurons, hidden = random_orders()
    after = reorder_model(model, heads, neurons, hidden)(**batch)
    torch.testing.assert_close(
        after.last_hidden_state, before.last_hidden_state[..., hidden], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        after.pooler_output, before.pooler_output[..., hidden], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_reorder_preserves_mlm_logits_and_the_tied_head(batch, family):
    model = tiny_bert(mlm=True, family=family)
    before = model(**batch).logits
    reorder_model(model, *random_orders(1))
    torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _masks(plan: SparsityPlan, heads, neurons, hidden) -> Masks:
    """Binary masks on the *unreordered* model that keep what `plan` keeps of the orders."""
    masks = Masks.ones(tiny_bert().config)
    masks.head.zero_()
    masks.neuron.zero_()
    masks.hidden.zero_()
    for i, (h, n) in enumerate(zip(plan.layer_heads, plan.layer_intermediate, strict=True)):
        masks.head[i, heads[i, :h]] = 1
        masks.neuron[i, neurons[i, :n]] = 1
    masks.hidden[hidden[: plan.hidden_size]] = 1
    return masks


PLANS = [
    SparsityPlan(50, 29, [3, 2], [40, 50], 24, 0, 0),
    SparsityPlan(90, 68, [0, 3], [64, 0], 16, 0, 0),  # a layer without attention, one without FFN
    SparsityPlan(99, 90, [0, 1], [0, 3], 8, 0, 0),  # layer 1 skipped entirely
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"s{p.sparsity:g}")
@pytest.mark.parametrize("mlm", [False, True], ids=["encoder", "mlm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_model_equals_masked_full_model(plan, mlm, family, batch):
    """Masks on the original model (independent of reorder and slicing) vs the sliced model
    (RoBERTa, XLM-R: their positions and MLM head kept)."""
    model = tiny_bert(mlm=mlm, family=family)
    orders = random_orders(2)
    with apply_masks(model, _masks(plan, *orders)):
        masked = model(**batch)
    sliced_model = slice_model(reorder_model(model, *orders), plan)
    sliced = sliced_model(**batch)
    keep = orders[2][: plan.hidden_size]
    if mlm:
        torch.testing.assert_close(sliced.logits, masked.logits, atol=1e-5, rtol=0)
        head = sliced_model.cls.predictions.decoder.weight
        assert head is sliced_model.bert.embeddings.word_embeddings.weight  # still tied
        assert head.shape == (TINY["vocab_size"], plan.hidden_size)
    else:
        torch.testing.assert_close(
            sliced.last_hidden_state, masked.last_hidden_state[..., keep], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            sliced.pooler_output, masked.pooler_output[..., keep], atol=1e-5, rtol=0
        )
    assert sliced_model.config.padded_positions == (family != "bert")
    layers = sliced_model.base_model.encoder.layer
    for layer, h, n in zip(layers, plan.layer_heads, plan.layer_intermediate, strict=True):
        assert (layer.attention is None) == (h == 0) and (layer.intermediate is None) == (n == 0)
        if h:
            assert layer.attention.self.query.weight.shape == (h * 8, plan.hidden_size)
        if n:
            assert layer.output.dense.weight.shape == (plan.hidden_size, n)


def test_plans_from_scores_slice_and_count(batch):
    model = tiny_bert()
    g = torch.Generator().manual_seed(0)
    plan = plan_sparsity(torch.rand(2, 4, generator=g), torch.rand(2, 64, generator=g), 32, 90)
    sliced = slice_model(model, plan)
    assert sum(p.numel() for p in sliced.parameters()) == sparse_params(sliced.config)
    assert sliced(**batch).last_hidden_state.shape == (3, 12, plan.hidden_size)


def test_sparse_gflops_by_hand():
    # unpruned: the dense formula
    dense = SparseBertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    assert sparse_gflops(dense) == pytest.approx(encoder_gflops(12, 768, 3072))
    assert round(sparse_gflops(dense), 1) == 22.3
    # layer 1: 2 heads of 8 and 10 neurons on d'=16; layer 2: no heads, 5 neurons; L = 128
    c = SparseBertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=10,
                         head_size=8, layer_heads=[2, 0], layer_intermediate=[10, 5])  # fmt: skip
    per_token = (4 * 16 * 16 + 2 * 128 * 16 + 2 * 16 * 10) + (2 * 16 * 5)
    assert sparse_gflops(c, 128) == pytest.approx(2 * 128 * per_token / 1e9)
    model = SparseBertModel(c)
    assert sum(p.numel() for p in model.parameters()) == sparse_params(c)
    assert model.encoder.layer[1].attention is None
