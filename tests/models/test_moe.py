"""MiniMoE student models: routing, dispatch, load balance, carving, FLOPs, export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel

from lmdistill.models.flops import encoder_gflops
from lmdistill.models.moe import (
    MiniMoEModel,
    RoutingStats,
    carve_indices,
    load_balance,
    minimoe_config,
    minimoe_gflops,
)

DENSE = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def _model(attention=1, ffn=4, seed=0, **kw) -> MiniMoEModel:
    torch.manual_seed(seed)
    config = minimoe_config(DENSE, attention, ffn, **kw)
    return MiniMoEModel._from_config(config, attn_implementation="sdpa")


def _batch(pad_id=0, extra_pad=0):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    if extra_pad:
        ids = torch.cat([ids, torch.full((3, extra_pad), pad_id)], 1)
        mask = torch.cat([mask, torch.zeros(3, extra_pad, dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": mask}


# --- carving -------------------------------------------------------------------------------


def test_carve_indices_follow_the_formula():
    # n = 6, E = 4: m = 4 shared, then m + e + k E
    assert carve_indices(6, 4) == [[0, 1, 2, 3, 4, 8], [0, 1, 2, 3, 5, 9],
                                   [0, 1, 2, 3, 6, 10], [0, 1, 2, 3, 7, 11]]  # fmt: skip
    assert carve_indices(4, 2) == [[0, 1, 2, 4], [0, 1, 3, 5]]  # m = 2
    assert carve_indices(1, 3) == [[0], [1], [2]]  # m = 0: nothing shared
    assert carve_indices(5, 1) == [[0, 1, 2, 3, 4]]  # one expert = the dense sublayer
    for n, e in [(1536, 4), (12, 2), (7, 8)]:
        for idx in carve_indices(n, e):
            assert len(idx) == n and len(set(idx)) == n and max(idx) < n * e


def test_carved_experts_share_exactly_the_first_two_thirds():
    model = _model(attention=2, ffn=4)
    ffn = model.encoder.layer[0].ffn  # I = 6: 4 shared neurons
    w_in, w_out = ffn.in_weight, ffn.out_weight  # [E, d, I], [E, I, d]
    for e in range(1, 4):
        assert torch.equal(w_in[e, :, :4], w_in[0, :, :4])
        assert torch.equal(w_out[e, :4], w_out[0, :4])
        assert not torch.equal(w_in[e, :, 4:], w_in[0, :, 4:])
        assert torch.equal(ffn.out_bias[e], ffn.out_bias[0])
    attention = model.encoder.layer[0].attention  # A = 4 heads of 8: 2 shared heads
    q, k, v = attention.qkv_weight.chunk(3, -1)  # [E, d, d] each
    for x in (q, k, v):
        assert torch.equal(x[1, :, :16], x[0, :, :16]) and not torch.equal(
            x[1, :, 16:], x[0, :, 16:]
        )
    assert torch.equal(attention.out_weight[1, :16], attention.out_weight[0, :16])
    assert w_in.std().item() == pytest.approx(0.02, rel=0.3)


def test_independent_init_shares_nothing():
    ffn = _model(ffn=4, init="independent").encoder.layer[0].ffn
    assert not torch.equal(ffn.in_weight[1, :, 0], ffn.in_weight[0, :, 0])


# --- routing and dispatch ------------------------------------------------------------------


def test_every_real_token_is_processed_by_exactly_its_expert():
    """The FFN output equals a per-token reference: LN(h + gate * Expert_e(h)); padding: LN(h)."""
    model = _model(ffn=4).eval()
    ffn = model.encoder.layer[0].ffn
    hidden = torch.randn(3, 10, 32)
    real = _batch()["attention_mask"].reshape(-1).bool()
    out, stats = ffn(hidden, real)
    flat, out = hidden.reshape(-1, 32), out.reshape(-1, 32)
    for t in range(30):
        if not real[t]:
            assert stats.expert[t] == 4
            torch.testing.assert_close(out[t], ffn.LayerNorm(flat[t]))
            continue
        e = int(stats.expert[t])
        assert e == int(stats.probs[t].argmax())
        y = torch.nn.functional.gelu(flat[t] @ ffn.in_weight[e] + ffn.in_bias[e])
        y = (y @ ffn.out_weight[e] + ffn.out_bias[e]) * stats.probs[t, e]
        torch.testing.assert_close(out[t], ffn.LayerNorm(flat[t] + y))
    assert len(set(stats.expert[real].tolist())) > 1  # the check covered several experts


def test_attention_experts_match_a_per_token_reference():
    model = _model(attention=2, ffn=1).eval()
    attention = model.encoder.layer[0].attention
    hidden = torch.randn(2, 5, 32)
    real = torch.ones(10, dtype=torch.bool)
    out, stats = attention(hidden, None, real)
    flat = hidden.reshape(10, 32)
    e = stats.expert
    qkv = torch.stack(
        [flat[t] @ attention.qkv_weight[e[t]] + attention.qkv_bias[e[t]] for t in range(10)]
    )
    q, k, v = (x.view(2, 5, 4, 8).transpose(1, 2) for x in qkv.chunk(3, -1))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v  # attention over all tokens
    ctx = ctx.transpose(1, 2).reshape(10, 32)
    y = torch.stack([(ctx[t] @ attention.out_weight[e[t]] + attention.out_bias[e[t]]) * stats.probs[t, e[t]]
                     for t in range(10)])  # fmt: skip
    torch.testing.assert_close(out.reshape(10, 32), attention.LayerNorm(flat + y))


def test_gradients_reach_the_router_and_every_parameter_even_with_an_unused_expert():
    model = _model(attention=2, ffn=4).train()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.ffn.router.classifier.bias[3] = -5.0  # expert 3 never chosen (not saturated)
            layer.attention.router.classifier.bias[1] = -5.0  # attention expert 1 never chosen
    out = model(**_batch())
    loss = out.last_hidden_state.pow(2).sum() + out.pooler_output.sum()
    loss = loss + sum(load_balance(r.stats) for r in model.routing)
    loss.backward()
    for r in model.routing:
        assert r.stats.expert[r.stats.real].max() < r.stats.probs.shape[-1] - 1
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    for layer in model.encoder.layer:
        assert layer.ffn.router.classifier.weight.grad.abs().sum() > 0
        assert layer.attention.router.classifier.weight.grad.abs().sum() > 0
        assert layer.ffn.in_weight.grad[3].abs().sum() == 0  # the idle expert: zero gradient


def test_router_noise_only_in_training():
    model = _model(ffn=4, router_noise=0.5)
    batch = _batch()
    model.eval()
    a = model(**batch).last_hidden_state
    assert torch.equal(a, model(**batch).last_hidden_state)
    model.train()
    torch.manual_seed(0)
    model(**batch)
    probs_train = model.routing[0].stats.probs
    model.eval()
    model(**batch)
    assert not torch.allclose(probs_train, model.routing[0].stats.probs)


# --- load balance --------------------------------------------------------------------------


def _stats(probs, expert, real=None):
    real = torch.ones(len(expert), dtype=torch.bool) if real is None else real
    return RoutingStats(probs, expert, real)


def test_balance_loss_is_one_at_a_uniform_split_and_larger_otherwise():
    e, n = 4, 8
    uniform = _stats(torch.full((n, e), 1 / e), torch.arange(n) % e)
    assert load_balance(uniform).item() == pytest.approx(1.0)
    # uniform routing fractions with uniform probabilities in any order: still 1
    peaked = torch.full((n, e), 0.1 / 3)
    peaked[:, 0] = 0.9
    skewed = _stats(peaked, torch.zeros(n, dtype=torch.long))
    assert load_balance(skewed).item() == pytest.approx(4 * 0.9)
    torch.manual_seed(0)
    for _ in range(20):
        probs = torch.randn(n, e).mul(3).softmax(-1)
        value = load_balance(_stats(probs, probs.argmax(-1))).item()
        assert (
            value >= 1.0 - 1e-6
            or not torch.bincount(probs.argmax(-1), minlength=e).eq(n // e).all()
        )


def test_padding_does_not_change_routing_statistics():
    e = 4
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])
    base = load_balance(_stats(probs, probs.argmax(-1)))
    pad_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(5, e)
    padded = _stats(torch.cat([probs, pad_probs]), torch.cat([probs.argmax(-1), torch.full((5,), e)]),
                    torch.tensor([True] * 3 + [False] * 5))  # fmt: skip
    torch.testing.assert_close(load_balance(padded), base)
    # through the model: other pad ids and extra pad columns change no real token's routing
    model = _model(attention=2, ffn=4).eval()
    runs = []
    for batch in (_batch(), _batch(pad_id=77), _batch(extra_pad=5)):
        model(**batch)
        runs.append([(r.stats.real_tokens(), load_balance(r.stats)) for r in model.routing])
    for other in runs[1:]:
        for ((p0, e0), lb0), ((p1, e1), lb1) in zip(runs[0], other, strict=True):
            assert torch.equal(e0, e1)
            torch.testing.assert_close(p0, p1)
            torch.testing.assert_close(lb0, lb1)


# --- equivalence, FLOPs, export ------------------------------------------------------------


def test_1x1_equals_a_dense_bert_with_the_same_weights():
    torch.manual_seed(0)
    dense = BertModel(DENSE).eval()
    moe = _model(attention=1, ffn=1).eval()
    assert set(moe.state_dict()) == set(dense.state_dict())
    moe.load_state_dict(dense.state_dict())
    batch = _batch()
    torch.testing.assert_close(moe(**batch).last_hidden_state, dense(**batch).last_hidden_state)
    assert moe.routing == []
    assert minimoe_gflops(moe.config) == encoder_gflops(2, 32, 6)


@pytest.mark.parametrize("x,y", [(1, 4), (2, 4), (1, 8)])
def test_gflops_equal_the_dense_students_within_the_routers_share(x, y):
    c = minimoe_config(BertConfig(hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                                  intermediate_size=1536), x, y)  # fmt: skip
    dense, moe = encoder_gflops(3, 384, 1536), minimoe_gflops(c)
    routers = 2 * 128 * 384 * (x if x > 1 else 0) * 3 / 1e9 + 2 * 128 * 384 * y * 3 / 1e9
    assert moe - dense == pytest.approx(routers)
    assert 0 < (moe - dense) / dense < 0.01


_ROUND_TRIP = """
import json, sys, torch
import lmdistill  # registers lmdistill-minimoe
from transformers import AutoModel, AutoModelForSequenceClassification
path, ref = sys.argv[1], torch.load(sys.argv[2])
model = AutoModel.from_pretrained(path).eval()
out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
res = clf(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], labels=torch.tensor([0, 1, 2]))
res.loss.backward()
print(json.dumps({"cls": type(model).__name__, "equal": torch.equal(out, ref["out"]),
                  "clf": type(clf).__name__, "logits": list(res.logits.shape),
                  "router_grad": clf.bert.encoder.layer[0].ffn.router.classifier.weight.grad is not None}))
"""


def test_export_round_trip_in_a_fresh_process(tmp_path):
    model = _model(attention=2, ffn=4).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path / "student")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["model_type"] == "lmdistill-minimoe" and config["ffn_experts"] == 4
    torch.save({**batch, "out": out}, tmp_path / "ref.pt")
    proc = subprocess.run([sys.executable, "-c", _ROUND_TRIP, str(tmp_path / "student"), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"cls": "MiniMoEModel", "equal": True, "clf": "MiniMoEForSequenceClassification",
                      "logits": [3, 3], "router_grad": True}  # fmt: skip


def test_a_boolean_key_mask_gives_the_two_dimensional_masks_outputs_and_routing():
    """[B, 1, 1, L] boolean masks (what distillation passes, to avoid a host read) are taken as
    they are: outputs on real tokens and routing equal those of the 2-D mask."""
    model = _model(attention=2, ffn=4).eval()
    batch = _batch()
    mask2d = batch["attention_mask"]
    two = model(input_ids=batch["input_ids"], attention_mask=mask2d)
    routing2 = [r.stats.expert for r in model.routing]
    four = model(input_ids=batch["input_ids"], attention_mask=(mask2d != 0)[:, None, None, :])
    real = mask2d.bool()
    torch.testing.assert_close(four.last_hidden_state[real], two.last_hidden_state[real])
    for a, r in zip(routing2, model.routing, strict=True):
        assert torch.equal(a, r.stats.expert)
