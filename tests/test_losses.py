"""Tests of lmdistill.losses: the fast relation KL against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmdistill import _relation_kernel as kernel
from lmdistill.errors import UserError
from lmdistill.losses import (
    LossInputError,
    RelationPlan,
    hidden_mse,
    relation_kl,
    relation_scores,
)

MIN32 = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------- references
def _scores_reference(left, right, mask, num_heads):
    """[B, R, L, L] float64 masked scores by an explicit per-head einsum (independent code)."""
    b, length, d = left.shape
    r = d // num_heads
    lh = left.double().reshape(b, length, num_heads, r)
    rh = right.double().reshape(b, length, num_heads, r)
    s = torch.einsum("bihc,bjhc->bhij", lh, rh) / math.sqrt(r)
    return s.masked_fill(mask[:, None, None, :] == 0, MIN32)


def _relation_kl_reference(teacher, student, mask, num_heads, reduction="rows"):
    """Plain autograd, float64, everything materialised; sequences without tokens left out."""
    s_t = _scores_reference(*teacher, mask, num_heads).detach()
    s_s = _scores_reference(*student, mask, num_heads)
    p_t = torch.softmax(s_t, -1)
    kl = p_t * (torch.log_softmax(s_t, -1) - torch.log_softmax(s_s, -1))
    kl = kl.masked_fill(mask[:, None, None, :] == 0, 0).sum(-1)  # [B, R, L]
    valid = (mask != 0).double()[:, None, :].expand_as(kl)
    if reduction == "rows":
        return (kl * valid).sum() / valid.sum()
    per_rows = valid.sum((1, 2))
    keep = per_rows > 0
    return ((kl * valid).sum((1, 2))[keep] / per_rows[keep]).mean()


def _numpy_kl(teacher, student, mask, num_heads):
    """Loops over b, h, i in NumPy float64 (reduction rows)."""
    total, rows = 0.0, 0
    tl, tr = (x.detach().double().numpy() for x in teacher)
    sl, sr = (x.detach().double().numpy() for x in student)
    m = mask.numpy() != 0
    for b in range(m.shape[0]):
        keys = np.flatnonzero(m[b])
        for h in range(num_heads):

            def rel(left, right, b=b, h=h, keys=keys):
                r = left.shape[-1] // num_heads
                a, c = left[b, :, h * r : (h + 1) * r], right[b, :, h * r : (h + 1) * r]
                s = (a @ c.T / math.sqrt(r))[:, keys]
                s = s - s.max(1, keepdims=True)
                return s - np.log(np.exp(s).sum(1, keepdims=True))

            lp, lq = rel(tl, tr), rel(sl, sr)
            for i in keys:
                total += float((np.exp(lp[i]) * (lp[i] - lq[i])).sum())
                rows += 1
    return total / rows


def _mask(batch=5, length=11):
    m = torch.ones(batch, length, dtype=torch.long)
    m[1, 7:] = 0  # right padding
    m[2, 2] = 0  # a hole: non-contiguous mask
    m[2, 9:] = 0
    m[3, :3] = 0  # left padding
    if batch > 4:
        m[4, :] = 0  # a sequence without tokens
    return m


def _inputs(shared, d_t=16, d_s=8, dtype=torch.float32, batch=5, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    tl = torch.randn(batch, length, d_t, generator=g, dtype=dtype)
    tr = tl if shared else torch.randn(batch, length, d_t, generator=g, dtype=dtype)
    sl = torch.randn(batch, length, d_s, generator=g, dtype=dtype).requires_grad_()
    sr = (
        sl if shared else torch.randn(batch, length, d_s, generator=g, dtype=dtype).requires_grad_()
    )
    return (tl, tr), (sl, sr)


def _grads(loss, student):
    params = [student[0]] if student[0] is student[1] else list(student)
    return torch.autograd.grad(loss, params)


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("reduction", ["rows", "per_sequence"])
@pytest.mark.parametrize("shared", [True, False], ids=["QQ", "QK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(reduction, shared, dtype):
    teacher, student = _inputs(shared, dtype=dtype)
    mask = _mask()
    fast = relation_kl(teacher, student, mask, 4, reduction)
    ref = _relation_kl_reference(teacher, student, mask, 4, reduction)
    assert fast.dtype == torch.float32 and fast.dim() == 0
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    for g_fast, g_ref in zip(_grads(fast, student), _grads(ref, student), strict=True):
        assert g_fast.dtype == dtype
        torch.testing.assert_close(g_fast.double(), g_ref.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("strategy", ["group", "per_sequence", "masked"])
def test_strategies_and_chunking_agree(strategy, monkeypatch):
    teacher, student = _inputs(False, d_t=24, d_s=12, batch=7, length=13, seed=3)
    mask = torch.ones(7, 13, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 5:] = 0
    mask[4, 6] = 0
    mask[5, 10:] = 0
    monkeypatch.setattr(kernel, "STRATEGY", strategy)
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 100)  # many chunks
    for reduction in ("rows", "per_sequence"):
        fast = relation_kl(teacher, student, mask, 3, reduction)
        ref = _relation_kl_reference(teacher, student, mask, 3, reduction)
        torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
        for g_fast, g_ref in zip(_grads(fast, student), _grads(ref, student), strict=True):
            torch.testing.assert_close(g_fast.double(), g_ref.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["rows", "per_sequence"])
def test_host_plan_and_masked_gpu_path_match_reference_and_masked_reads_nothing(
    reduction, monkeypatch
):
    teacher, student = _inputs(True, batch=5, length=11, seed=4)
    mask = torch.ones(5, 11, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 3] = 0  # not contiguous
    mask[3] = 0  # no real token
    ref = _relation_kl_reference(teacher, student, mask, 4, reduction)
    plan = RelationPlan.of(mask)
    assert plan == RelationPlan((7, 11, 10, 0, 11), (7, 11, 11, 0, 11))
    with_plan = relation_kl(teacher, student, mask, 4, reduction, plan)
    torch.testing.assert_close(with_plan.double(), ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(kernel, "STRATEGY", "masked")
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name, **k: (
            reads.append(_n), _o(t, *a, **k))[1])  # fmt: skip
    masked = relation_kl(teacher, student, mask, 4, reduction)
    grads = torch.autograd.grad(masked, student[0])
    monkeypatch.undo()
    assert reads == []  # nothing waits for the device
    torch.testing.assert_close(masked.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), _grads(ref, student)[0].double(), rtol=1e-4,
                               atol=1e-7)  # fmt: skip


def test_numpy_forward_tiny():
    teacher, student = _inputs(False, d_t=6, d_s=4, batch=2, length=5, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]])
    fast = relation_kl(teacher, student, mask, 2).item()
    assert fast == pytest.approx(_numpy_kl(teacher, student, mask, 2), rel=1e-5)


def test_relation_scores_plain_formula():
    (tl, tr), _ = _inputs(False)
    mask = _mask()
    s = relation_scores(tl, tr, mask, 4)
    assert s.shape == (5, 4, 11, 11) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), _scores_reference(tl, tr, mask, 4), rtol=1e-5, atol=1e-5)


def test_autocast_bf16_computes_in_float32():
    teacher, student = _inputs(False, d_t=32, d_s=16)
    mask = _mask()
    plain = relation_kl(teacher, student, mask, 4)
    g_plain = _grads(plain, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = relation_kl(teacher, student, mask, 4)
        scores = relation_scores(*student, mask, 4)
    assert auto.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(auto, student), g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # bf16 inputs (as an autocast model produces them): equal to float32 math on their values
    t16 = tuple(x.bfloat16() for x in teacher)
    s16 = tuple(x.detach().bfloat16().requires_grad_() for x in student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relation_kl(t16, s16, mask, 4)
    ref = relation_kl(tuple(x.float() for x in t16), tuple(x.float() for x in s16), mask, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    g16 = _grads(out, s16)
    assert all(g.dtype == torch.bfloat16 for g in g16)


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("reduction", ["rows", "per_sequence"])
def test_zero_iff_equal(reduction):
    teacher, student = _inputs(False, d_t=8, d_s=8)
    mask = _mask()
    same = tuple(x.detach().clone().requires_grad_() for x in teacher)
    zero = relation_kl(teacher, same, mask, 4, reduction)
    assert abs(zero.item()) < 1e-6
    for g in _grads(zero, same):
        assert g.abs().max() < 1e-6
    assert relation_kl(teacher, student, mask, 4, reduction).item() > 1e-3


def test_padding_values_do_not_matter():
    teacher, student = _inputs(False)
    mask = _mask()
    loss = relation_kl(teacher, student, mask, 4, "per_sequence")
    grads = _grads(loss, student)
    pad = (mask == 0)[..., None]
    garbage = lambda x: torch.where(pad, torch.randn_like(x) * 1e3, x)  # noqa: E731
    t2 = tuple(garbage(x) for x in teacher)
    s2 = tuple(garbage(x.detach()).requires_grad_() for x in student)
    loss2 = relation_kl(t2, s2, mask, 4, "per_sequence")
    torch.testing.assert_close(loss2, loss)
    for g, g2 in zip(grads, _grads(loss2, s2), strict=True):
        torch.testing.assert_close(g2, g)
        assert (g2 * pad).abs().max() == 0 and (g * pad).abs().max() == 0


def test_teacher_from_inference_mode_gets_no_grad():
    _, student = _inputs(False)
    mask = _mask()
    with torch.inference_mode():
        teacher = tuple(torch.randn(5, 11, 16) for _ in range(2))
    assert teacher[0].is_inference()
    loss = relation_kl(teacher, student, mask, 4)
    loss.backward()
    assert all(x.grad is not None for x in student)
    # teacher tensors that require grad are constants: they get no gradient
    t_grad = tuple(x.clone().requires_grad_() for x in teacher)
    s2 = tuple(x.detach().clone().requires_grad_() for x in student)
    relation_kl(t_grad, s2, mask, 4).backward()
    assert all(x.grad is None for x in t_grad)
    torch.testing.assert_close(s2[0].grad, student[0].grad)
    # no grad anywhere (evaluation): works, no graph
    with torch.no_grad():
        val = relation_kl(teacher, student, mask, 4)
    assert not val.requires_grad and val.item() == pytest.approx(loss.item(), rel=1e-6)


def test_grad_output_scaling_and_double_backward_of_sum():
    teacher, student = _inputs(False)
    mask = _mask()
    (g1,) = torch.autograd.grad(relation_kl(teacher, student, mask, 4), student[0])
    (g3,) = torch.autograd.grad(3.0 * relation_kl(teacher, student, mask, 4), student[0])
    torch.testing.assert_close(g3, 3 * g1)


# ----------------------------------------------------------------------------- MiniLM v1
def _per_head_attention_kl(teacher, student, mask, heads):
    """AT / VR of MiniLM v1 by an explicit loop over heads, BertSelfAttention-style."""
    total, rows = 0.0, 0
    ext = (1.0 - mask[:, None, None, :].double()) * MIN32  # HF extended attention mask
    for h in range(heads):
        probs = []
        for left, right in (teacher, student):
            a = left.shape[-1] // heads
            q = left[..., h * a : (h + 1) * a].double()
            k = right[..., h * a : (h + 1) * a].double()
            probs.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a) + ext[:, 0], -1))
        p_t, p_s = probs
        kl = torch.where(p_t > 0, p_t * (p_t.log() - p_s.log()), 0).sum(-1)  # [B, L]
        total = total + (kl * mask).sum()
        rows += int(mask.sum())
    return total / rows


def test_minilm_v1_equivalence_per_head():
    g = torch.Generator().manual_seed(7)
    mask = _mask(4, 9)
    qt, kt, vt = (torch.randn(4, 9, 24, generator=g) for _ in range(3))
    qs, ks, vs = (torch.randn(4, 9, 12, generator=g) for _ in range(3))
    at = relation_kl((qt, kt), (qs, ks), mask, 4)
    vr = relation_kl((vt, vt), (vs, vs), mask, 4)
    torch.testing.assert_close(
        at.double(), _per_head_attention_kl((qt, kt), (qs, ks), mask, 4), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        vr.double(), _per_head_attention_kl((vt, vt), (vs, vs), mask, 4), rtol=1e-5, atol=1e-6
    )


def test_minilm_v1_equivalence_bert_model():
    transformers = pytest.importorskip("transformers")

    def tiny(seed, hidden):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=32,
            attn_implementation="eager",
        )
        assert cfg._attn_implementation == "eager"
        return transformers.BertModel(cfg).eval()

    def run(model, ids, mask):
        got = {}
        sa = model.encoder.layer[-1].attention.self
        hooks = [
            getattr(sa, n).register_forward_hook(lambda _m, _i, out, n=n: got.__setitem__(n, out))
            for n in ("query", "key")
        ]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        for h in hooks:
            h.remove()
        return got["query"], got["key"], out.attentions[-1]

    ids = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    q_t, k_t, p_t = run(tiny(0, 32), ids, mask)
    q_s, k_s, p_s = run(tiny(1, 16), ids, mask)
    loss = relation_kl((q_t, k_t), (q_s, k_s), mask, 4)
    keys = mask[:, None, None, :].bool()
    kl = torch.where(keys, p_t.double() * (p_t.double().log() - p_s.double().log()), 0).sum(-1)
    rows = mask[:, None, :].expand_as(kl).double()
    expected = (kl * rows).sum() / rows.sum()
    assert abs(loss.item() - expected.item()) < 1e-5


# ----------------------------------------------------------------------------- errors
def test_errors():
    teacher, student = _inputs(False, d_t=16, d_s=12)
    mask = _mask()
    with pytest.raises(ValueError, match=r"R=5.*teacher d=16.*student d=12.*one of 1, 2, 4$"):
        relation_kl(teacher, student, mask, 5)  # gcd 4: below the usual 8..64, its divisors
    wide = _inputs(False, d_t=768, d_s=384)
    with pytest.raises(ValueError, match=r"one of 8, 12, 16, 24, 32, 48, 64$"):
        relation_kl(*wide, mask, 5)  # the divisors of gcd 384 in 8..64
    with pytest.raises(LossInputError, match="left and right"):
        relation_kl(teacher, (student[0], student[1][:, :5]), mask, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        relation_kl(teacher, student, mask[:, :5], 4)
    with pytest.raises(ValueError, match="reduction"):
        relation_kl(teacher, student, mask, 4, "mean")
    with pytest.raises(UserError, match="share"):
        relation_kl(teacher, tuple(x[:2] for x in student), mask, 4)
    with pytest.raises(ValueError, match="R=5"):
        relation_scores(student[0], student[1], mask, 5)


def test_all_padding_gives_zero():
    teacher, student = _inputs(False)
    mask = torch.zeros(5, 11, dtype=torch.long)
    for reduction in ("rows", "per_sequence"):
        loss = relation_kl(teacher, student, mask, 4, reduction)
        assert loss.item() == 0.0
        assert all(g.abs().max() == 0 for g in _grads(loss, student))


# ----------------------------------------------------------------------------- hidden MSE
def test_hidden_mse():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    loss = hidden_mse(s, t, mask)
    sel = mask.bool()
    expected = ((s[sel] - t[sel]) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s.grad[~sel].abs().max() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hidden_mse(s, t, mask).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        hidden_mse(s, t[..., :2], mask)
