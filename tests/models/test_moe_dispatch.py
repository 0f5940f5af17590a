"""MiniMoE dispatch: no host synchronisation, and equality with plain per-token references.

Both implementations of `grouped_linear` are checked on CPU: `torch._grouped_mm` (taken for
aligned sizes) and the tiled `bmm` fallback (CUDA float32, older GPUs; forced here).
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from lmdistill.models import moe_routing
from lmdistill.models.moe import MiniMoEModel, minimoe_config
from lmdistill.models.moe_routing import dispatch, grouped_linear, permute_rows, unpermute_rows

IMPLS = ("grouped_mm", "tiles")
# d = 16, I = 24, 4 heads: sizes aligned to 16 bytes in float32 (the grouped_mm path on CPU)
DENSE = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=24, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)  # fmt: skip


def _use(impl: str, monkeypatch) -> list[bool]:
    """Route `grouped_linear` through `impl`; returns the support decisions seen."""
    original = moe_routing.grouped_mm_supported
    taken = []

    def choose(x, weight):
        supported = original(x, weight) or x.is_meta  # meta: where the test allows it
        taken.append(supported)
        return supported and impl == "grouped_mm"

    monkeypatch.setattr(moe_routing, "grouped_mm_supported", choose)
    return taken


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Each test once per implementation; the grouped_mm case must really take it."""
    taken = _use(request.param, monkeypatch)
    yield request.param
    assert taken and all(taken)


def _routing(n: int, num_experts: int, kind: str, seed: int = 0) -> torch.Tensor:
    """Expert per position (num_experts = padding): several layouts, with idle experts."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mixed":  # expert 2 idle, padding interleaved
        expert = torch.tensor([0, 1, 3])[torch.randint(0, 3, (n,), generator=g)]
        expert[torch.rand(n, generator=g) < 0.3] = num_experts
    elif kind == "one_expert":
        expert = torch.full((n,), 1)
        expert[-5:] = num_experts
    elif kind == "no_padding":
        expert = torch.randint(0, num_experts, (n,), generator=g)
    else:  # all padding: no expert gets a token
        expert = torch.full((n,), num_experts)
    return expert


def test_dispatch_groups_positions_by_expert_with_padding_last():
    expert = torch.tensor([2, 4, 0, 2, 1, 4, 0, 0, 2])  # E = 4: expert 3 idle, 4 = padding
    route = dispatch(expert, 4)
    assert route.order.tolist() == [2, 6, 7, 4, 0, 3, 8, 1, 5]  # stable within an expert
    assert route.expert.tolist() == [0, 0, 0, 1, 2, 2, 2, 4, 4]
    assert route.ends.tolist() == [3, 4, 7, 7] and route.ends.dtype == torch.int32
    assert route.pad[:, 0].tolist() == [False] * 7 + [True] * 2


@pytest.mark.parametrize("kind", ["mixed", "one_expert", "no_padding", "all_padding"])
def test_grouped_linear_equals_a_per_token_reference(impl, kind):
    """Outputs and gradients of x, weight and bias, against per-token matmuls (float32)."""
    n, e, d_in, d_out = 75, 4, 8, 12  # several tiles per expert in the tiled fallback
    torch.manual_seed(1)
    x = torch.randn(n, d_in, requires_grad=True)
    weight = torch.randn(e, d_in, d_out, requires_grad=True)
    bias = torch.randn(e, d_out, requires_grad=True)
    upstream = torch.randn(n, d_out)
    expert = _routing(n, e, kind)
    route = dispatch(expert, e)
    out = grouped_linear(permute_rows(x, route.order), weight, bias, route)
    out = unpermute_rows(out, route.order)  # back to positions
    (out * upstream).sum().backward()
    grads = [t.grad.clone() for t in (x, weight, bias)]

    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    rows = []
    for t, k in enumerate(expert.tolist()):  # position by position, from the routing alone
        rows.append(xr[t] @ wr[k] + br[k] if k < e else torch.zeros(d_out))
    ref = torch.stack(rows)
    keep = sum(0 * t.sum() for t in (xr, wr, br))  # gradients (zero) also without any token
    ((ref * upstream).sum() + keep).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    padding = expert == e
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    for got, want in zip(grads, (xr.grad, wr.grad, br.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    idle = [k for k in range(e) if not (expert == k).any()]
    for k in idle:  # experts without tokens: exactly zero gradient
        assert grads[1][k].abs().sum() == 0 and grads[2][k].abs().sum() == 0


def _model(attention: int, ffn: int, seed: int = 0) -> MiniMoEModel:
    torch.manual_seed(seed)
    model = MiniMoEModel._from_config(minimoe_config(DENSE, attention, ffn),
                                      attn_implementation="sdpa")  # fmt: skip
    return model.eval()  # no router noise, no dropout: a deterministic routing


def _hidden_and_real(b=3, length=9):
    torch.manual_seed(2)
    hidden = torch.randn(b, length, DENSE.hidden_size, requires_grad=True)
    real = torch.ones(b, length, dtype=torch.bool)
    real[1, 5:] = False
    real[2, 2:] = False
    return hidden, real


def test_moe_ffn_matches_a_per_token_reference_with_gradients(impl):
    ffn = _model(1, 4).encoder.layer[0].ffn
    with torch.no_grad():
        ffn.router.classifier.bias[2] = -8.0  # expert 2 never chosen
    hidden, real = _hidden_and_real()
    out, stats = ffn(hidden, real.reshape(-1))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    params = dict(ffn.named_parameters())
    grads = {k: p.grad.clone() for k, p in params.items()}
    grad_hidden = hidden.grad.clone()

    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    hr = hidden.detach().clone().requires_grad_()
    flat = hr.reshape(-1, DENSE.hidden_size)
    w = ref_params
    logits = flat @ w["router.classifier.weight"].t() + w["router.classifier.bias"]
    probs = torch.softmax(logits, -1)
    expert = probs.argmax(-1)
    gate = probs.gather(1, expert[:, None])[:, 0]
    assert torch.equal(expert[real.reshape(-1)], stats.expert[real.reshape(-1)])
    assert 2 not in expert[real.reshape(-1)].tolist()
    rows = []
    for t, is_real in enumerate(real.reshape(-1).tolist()):
        if not is_real:
            rows.append(torch.zeros(DENSE.hidden_size))
            continue
        k = int(expert[t])
        y = torch.nn.functional.gelu(flat[t] @ w["in_weight"][k] + w["in_bias"][k])
        rows.append((y @ w["out_weight"][k] + w["out_bias"][k]) * gate[t])
    y = torch.stack(rows).view_as(hr)
    ref = torch.nn.functional.layer_norm(hr + y, (DENSE.hidden_size,), w["LayerNorm.weight"],
                                         w["LayerNorm.bias"], DENSE.layer_norm_eps)  # fmt: skip
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden, hr.grad, rtol=1e-5, atol=1e-5)
    for k in params:
        torch.testing.assert_close(grads[k], ref_params[k].grad, rtol=1e-5, atol=1e-5, msg=k)
    assert grads["in_weight"][2].abs().sum() == 0 and grads["out_bias"][2].abs().sum() == 0


def test_moe_attention_matches_a_per_token_reference_with_gradients(impl):
    attention = _model(3, 1).encoder.layer[0].attention
    with torch.no_grad():
        attention.router.classifier.bias[1] = -8.0  # expert 1 never chosen
    hidden, real = _hidden_and_real()
    b, length, d = hidden.shape
    mask = real[:, None, None, :]  # SDPA boolean mask: padding keys excluded
    out, _ = attention(hidden, mask, real.reshape(-1))
    upstream = torch.randn_like(out)  # padding rows too: they reach h through LN(h) only
    (out * upstream).sum().backward()
    params = dict(attention.named_parameters())
    grads = {k: p.grad.clone() for k, p in params.items()}
    grad_hidden = hidden.grad.clone()

    w = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    hr = hidden.detach().clone().requires_grad_()
    flat = hr.reshape(-1, d)
    logits = flat @ w["router.classifier.weight"].t() + w["router.classifier.bias"]
    probs = torch.softmax(logits, -1)
    expert = probs.argmax(-1)
    flags = real.reshape(-1).tolist()
    qkv = torch.stack([flat[t] @ w["qkv_weight"][expert[t]] + w["qkv_bias"][expert[t]]
                       if flags[t] else torch.zeros(3 * d) for t in range(b * length)])  # fmt: skip
    q, k, v = (x.view(b, length, 4, d // 4).transpose(1, 2) for x in qkv.chunk(3, -1))
    scores = (q @ k.transpose(-1, -2)) / (d // 4) ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    ctx = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b * length, d)
    y = torch.stack([(ctx[t] @ w["out_weight"][expert[t]] + w["out_bias"][expert[t]])
                     * probs[t, expert[t]] if flags[t] else torch.zeros(d)
                     for t in range(b * length)])  # fmt: skip
    ref = torch.nn.functional.layer_norm(hr + y.view_as(hr), (d,), w["LayerNorm.weight"],
                                         w["LayerNorm.bias"], DENSE.layer_norm_eps)  # fmt: skip
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden, hr.grad, rtol=1e-5, atol=1e-5)
    for name in params:
        torch.testing.assert_close(grads[name], w[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    assert grads["qkv_weight"][1].abs().sum() == 0


_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("train", [True, False])
def test_moe_layers_never_read_a_tensor_on_the_host(impl, train):
    """Forward + backward of MoE attention and FFN layers: no host read of any tensor value."""
    model = _model(2, 4).train(train)
    layer = model.encoder.layer[0]
    hidden, real = _hidden_and_real()
    mask = real[:, None, None, :]
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        for name in _SYNCS:
            original = getattr(torch.Tensor, name)

            def counting(self, *args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counting)
        out, routing = layer(hidden, mask, real.reshape(-1))
        loss = out.square().sum() + sum(moe_routing.load_balance(s) for s in routing.values())
        loss.backward()
    assert calls == []
    assert set(routing) == {"attention", "ffn"} and hidden.grad is not None


@pytest.mark.parametrize("impl,dtype", [("tiles", torch.float32), ("tiles", torch.bfloat16),
                                        ("grouped_mm", torch.bfloat16)])  # fmt: skip
def test_moe_layers_run_on_the_meta_device(impl, dtype, monkeypatch):
    """No shape or value depends on the routing: the layers run on tensors without data
    (any `.item()`, also inside an op such as `bincount`, raises on "meta"). The meta kernel
    of torch._grouped_mm mirrors CUDA's: bfloat16 only."""
    _use(impl, monkeypatch)
    layer = _model(2, 4).encoder.layer[0].train().to(device="meta", dtype=dtype)
    hidden = torch.empty(3, 9, DENSE.hidden_size, device="meta", dtype=dtype, requires_grad=True)
    real = torch.empty(27, device="meta", dtype=torch.bool)
    mask = torch.empty(3, 1, 1, 9, device="meta", dtype=torch.bool)
    out, routing = layer(hidden, mask, real)
    (out.sum() + sum(moe_routing.load_balance(s) for s in routing.values())).backward()
    assert out.shape == hidden.shape and all(p.grad is not None for p in layer.parameters())


def _run_layer(layer, hidden, real, device, dtype):
    """Forward + backward of one MoE layer on `device` (autocast to `dtype` unless float32)."""
    layer = layer.to(device)
    layer.zero_grad(set_to_none=True)
    h = hidden.detach().to(device).requires_grad_()
    real = real.to(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out, _ = layer(h, real[:, None, None, :], real.reshape(-1))
    out.float().square().sum().backward()
    return [out.float().cpu(), h.grad.float().cpu()] + [
        p.grad.float().cpu() for p in layer.parameters()
    ]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_moe_layer_never_waits_for_the_host(dtype):
    """A training-mode forward + backward under `torch.cuda.set_sync_debug_mode("error")`
    (bf16 on sm90+: torch._grouped_mm; float32: the tiled fallback)."""
    layer = _model(2, 4).encoder.layer[0].train()
    hidden, real = _hidden_and_real(b=4, length=32)
    _run_layer(layer, hidden, real, "cuda", dtype)  # warm-up: lazy CUDA initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_layer(layer, hidden, real, "cuda", dtype)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_matches_cpu_and_the_tiled_fallback(dtype, monkeypatch):
    """float32: CUDA equals CPU; on CUDA the automatic choice equals the forced tiled `bmm`."""
    layer = _model(2, 4).encoder.layer[0]
    hidden, real = _hidden_and_real(b=4, length=32)
    auto = _run_layer(layer, hidden, real, "cuda", dtype)
    if dtype == torch.float32:
        for got, want in zip(auto, _run_layer(layer, hidden, real, "cpu", dtype), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(moe_routing, "grouped_mm_supported", lambda x, weight: False)
    tiles = _run_layer(layer, hidden, real, "cuda", dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in zip(auto, tiles, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
