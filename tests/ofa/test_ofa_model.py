"""The super-net: full size = dense BERT, sub-network (l, h) = a small dense BERT of sliced
weights, dropped layers never applied, Q/K/V capture of the sub-network's last layer."""

from __future__ import annotations

import pytest
import torch
from ofa_nets import HIDDEN, LAYERS
from torch.testing import assert_close
from transformers import AutoModel, BertConfig, BertModel

from lmdistill.errors import UserError
from lmdistill.models.capture import forward_qkv
from lmdistill.models.ofa_model import OFABertModel

TOL = {"atol": 1e-5, "rtol": 1e-5}


def sliced_bert(dense: BertModel, layers: int, hidden: int) -> BertModel:
    """An independently built small BERT holding the leading blocks of `dense`'s weights."""
    c = dense.config
    small = BertModel(
        BertConfig(
            vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 16,
            intermediate_size=4 * hidden,
            attn_implementation="sdpa",
        )
    ).eval()
    big = dense.state_dict()
    state = {}
    for key, value in small.state_dict().items():
        source = big[key]
        if value.dim() == 2:
            state[key] = source[: value.shape[0], : value.shape[1]]
        else:
            state[key] = source[: value.shape[0]]
    small.load_state_dict(state)
    return small


def test_full_size_equals_dense_bert(dense_bert, supernet, batch):
    expected = dense_bert(**batch)
    got = supernet(**batch)
    assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    assert_close(got.pooler_output, expected.pooler_output, **TOL)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_subnet_equals_sliced_dense_bert(dense_bert, supernet, batch, layers, hidden):
    small = sliced_bert(dense_bert, layers, hidden)
    supernet.set_subnet(layers, hidden)
    got = supernet(**batch)
    expected = small(**batch)
    assert got.last_hidden_state.shape == (3, 12, hidden)
    assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    assert_close(got.pooler_output, expected.pooler_output, **TOL)
    qkv = forward_qkv(supernet, layers - 1, **batch)  # the sub-network's last layer
    expected_qkv = forward_qkv(small, layers - 1, **batch)
    for x, y in zip(qkv, expected_qkv, strict=True):
        assert x.shape == (3, 12, hidden)
        assert_close(x, y, **TOL)


def test_boolean_key_mask_is_taken_as_it_is(supernet, batch):
    key_mask = (batch["attention_mask"] != 0)[:, None, None, :]  # [B, 1, 1, L], no host read
    with supernet.subnet(2, 32):
        expected = supernet(**batch).last_hidden_state
        got = supernet(**{**batch, "attention_mask": key_mask}).last_hidden_state
    assert_close(got, expected, **TOL)


def test_dropped_layers_are_not_applied(supernet, batch):
    with supernet.subnet(3, 48):
        expected = supernet(**batch).last_hidden_state
    called = []
    hooks = [
        m.register_forward_hook(lambda *_: called.append(1))
        for layer in supernet.encoder.layer[1:]
        for m in layer.modules()
    ]
    with torch.no_grad():
        for p in supernet.encoder.layer[1:].parameters():
            p.fill_(float("nan"))  # any use of a dropped layer (its LayerNorms too) shows
    with supernet.subnet(1, 48):
        out = supernet(**batch).last_hidden_state
    for h in hooks:
        h.remove()
    assert not called
    assert torch.isfinite(out).all()
    assert not torch.equal(out, expected)


def test_gradients_reach_only_the_subnet(supernet, batch):
    supernet.train()
    with supernet.subnet(2, 32):
        q, k, v = forward_qkv(supernet, 1, **batch)
        (q.square().sum() + k.sum() + v.sum()).backward()
    query = supernet.encoder.layer[1].attention.self.query.weight.grad  # [64, 64]
    assert query[:32, :32].abs().sum() > 0
    assert query[32:].abs().sum() == 0 and query[:, 32:].abs().sum() == 0
    ffn = supernet.encoder.layer[0].intermediate.dense.weight.grad  # [256, 64]
    assert ffn[:128, :32].abs().sum() > 0 and ffn[128:].abs().sum() == 0
    assert all(p.grad is None for p in supernet.encoder.layer[2].parameters())


def test_subnet_context_restores_and_rejects_impossible_shapes(supernet):
    with supernet.subnet(2, 32) as shape:
        assert (shape.layers, shape.hidden, shape.heads, shape.intermediate) == (2, 32, 2, 128)
    assert supernet.active == (3, 64, 4, 256)
    for layers, hidden in ((4, 64), (0, 64), (3, 40), (3, 80), (3, 0)):
        with pytest.raises(UserError, match="impossible"):
            supernet.set_subnet(layers, hidden)
    assert supernet.active == (3, 64, 4, 256)


def test_saved_supernet_loads_with_automodel(supernet, batch, tmp_path):
    supernet.set_subnet(2, 48)
    expected = supernet(**batch).last_hidden_state
    supernet.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # registered by `import lmdistill`
    assert isinstance(loaded, OFABertModel)
    assert loaded.config.ofa_layers == LAYERS and loaded.config.ofa_hidden == HIDDEN
    assert loaded.config.family()[0] == (3, 64) and len(loaded.config.family()) == 9
    loaded.set_subnet(2, 48)
    assert_close(loaded(**batch).last_hidden_state, expected, **TOL)


def test_family_member_that_is_no_subnet_is_rejected(dense_bert):
    with pytest.raises(UserError, match="h=40"):
        OFABertModel.from_dense(dense_bert, [3], [64, 40])
