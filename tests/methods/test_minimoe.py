"""The MiniMoE LightningModule: loss terms, gradients, relation sites, logging, FLOPs."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import UserError
from lmdistill.methods import MiniLMv2, MiniMoE
from lmdistill.models import MoESettings, build_student, load_teacher, moe_student
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.moe import MiniMoEModel, load_balance

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


def _dense(teacher):
    torch.manual_seed(0)
    return build_student(teacher.config, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # fmt: skip


def _module(teacher, x=1, y=4, **kw):
    moe = MoESettings(**{"attention_experts": x, "ffn_experts": y, **kw.pop("moe", {})})
    student = moe_student(_dense(teacher), moe)
    module = MiniMoE(teacher, student, moe.balance_weight, relation_heads=4, **kw)
    module.freeze_unreached()
    return module


def test_loss_is_the_relation_mean_plus_weighted_balance(teacher, padded_batch):
    module = _module(teacher, 2, 4, moe={"balance_weight": 0.5})
    assert isinstance(module.student, MiniMoEModel) and module.relation_site == "top_projection"
    terms = module.loss_terms(module.teacher_qkv(padded_batch), module.student_qkv(padded_batch),
                              padded_batch["attention_mask"])  # fmt: skip
    assert set(terms) == {"qq", "kk", "vv", "balance"}
    per_kind = {}
    for r in module.student.routing:
        per_kind.setdefault(r.kind, []).append(load_balance(r.stats))
    assert set(per_kind) == {"attention", "ffn"} and len(per_kind["ffn"]) == 2
    expected = (torch.stack(per_kind["attention"]).mean() + torch.stack(per_kind["ffn"]).mean()) / 2
    torch.testing.assert_close(terms["balance"], expected)
    relation = (terms["qq"] + terms["kk"] + terms["vv"]) / 3
    torch.testing.assert_close(module.combine(terms), relation + 0.5 * terms["balance"])


def test_relation_terms_equal_minilm_v2_on_the_same_qkv(teacher, padded_batch):
    moe, v2 = _module(teacher), MiniLMv2(teacher, _dense(teacher), relation_heads=4)
    t, s = moe.teacher_qkv(padded_batch), moe.student_qkv(padded_batch)
    mask = padded_batch["attention_mask"]
    a, b = moe.loss_terms(t, s, mask), v2.loss_terms(t, s, mask)
    for name in ("qq", "kk", "vv"):
        torch.testing.assert_close(a[name], b[name])


@pytest.mark.parametrize("x,y,site", [(1, 4, "top_projection"), (2, 4, "top_projection"),
                                      (2, 4, "last_layer"), (1, 4, "last_layer")])  # fmt: skip
def test_every_trainable_parameter_gets_a_gradient_even_with_an_idle_expert(
    teacher, padded_batch, x, y, site
):
    """DDP without find_unused_parameters: also when an expert receives no token."""
    module = _module(teacher, x, y, relation_site=site)
    with torch.no_grad():
        for layer in module.student.encoder.layer:
            layer.ffn.router.classifier.bias[-1] = -5.0
            if x > 1:
                layer.attention.router.classifier.bias[-1] = -5.0
    module.training_step(padded_batch, 0).backward()
    for r in module.student.routing:
        assert r.stats.expert[r.stats.real].max() < r.stats.probs.shape[-1] - 1  # idle expert
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    routers = [n for n, p in module.named_parameters() if "router" in n and p.requires_grad]
    assert routers and all(
        module.get_parameter(n).grad.abs().sum() > 0 for n in routers if n.endswith("weight")
    )
    if site == "last_layer":  # the top layer's FFN (and its router) is never computed
        assert any("layer.1.ffn" in n for n in module.frozen_parameters)
        assert not any("relation_projection" in n for n, _ in module.named_parameters())


@pytest.mark.parametrize("x,y,site", [(1, 1, "last_layer"), (2, 1, "last_layer"),
                                      (1, 2, "last_layer"), (2, 2, "last_layer"),
                                      (2, 2, "top_projection")])  # fmt: skip
def test_gradient_map_of_each_relation_site_and_expert_placement(teacher, padded_batch, x, y, site):
    """docs/methods.md section 5: at the last-layer site the top layer's Q/K/V (its experts and
    their router, which only the load balance reaches) train; its attention output, its FFN and
    the pooler never get a gradient. At the top projection only the pooler does not."""
    module = _module(teacher, x, y, relation_site=site)
    top = "student.encoder.layer.1."
    qkv = ("attention.self.", "attention.qkv_", "attention.router.")
    expected = {n for n, _ in module.named_parameters() if n.startswith("student.pooler.")
                or (site == "last_layer" and n.startswith(top) and not n.startswith(qkv, len(top)))}  # fmt: skip
    assert set(module.frozen_parameters) == expected
    module.training_step(padded_batch, 0).backward()
    trained = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in trained.values())
    kinds = [k for k, e in (("attention", x), ("ffn", y)) if e > 1]
    top_kinds = kinds if site == "top_projection" else [k for k in kinds if k == "attention"]
    routed = [(r.layer, r.kind) for r in module.student.routing]  # all in the load balance
    assert routed == [(0, k) for k in kinds] + [(1, k) for k in top_kinds]


def test_routing_metrics_are_loads_and_entropies(teacher, padded_batch):
    module = _module(teacher, 2, 4)
    module.student_qkv(padded_batch)
    metrics = module.log_routing()
    loads = [v for k, v in metrics.items() if k.startswith("moe/layer1_ffn/load_e")]
    assert len(loads) == 4 and float(sum(loads)) == pytest.approx(1.0)
    assert 0 < float(metrics["moe/layer2_attention/entropy"]) <= torch.log(torch.tensor(2.0)) + 1e-6


def test_gflops_and_params_against_the_dense_student(teacher):
    module = _module(teacher, 1, 4)
    dense = _dense(teacher)
    c = dense.config
    gflops_dense = encoder_gflops(c.num_hidden_layers, c.hidden_size, c.intermediate_size, 128)
    router_share = 2 * 128 * 32 * 4 * 2 / 1e9
    assert module.student_gflops(128) == pytest.approx(gflops_dense + router_share)
    assert sum(p.numel() for p in module.student.parameters()) > sum(
        p.numel() for p in dense.parameters()
    )


def test_1x1_student_is_the_dense_student(teacher, padded_batch):
    dense = _dense(teacher).eval()
    module = _module(teacher, 1, 1)
    student = module.student.eval()
    torch.testing.assert_close(
        student(**padded_batch).last_hidden_state, dense(**padded_batch).last_hidden_state
    )


def test_bad_settings_are_user_errors(teacher):
    with pytest.raises(UserError, match="moe.ffn_experts"):
        _module(teacher, 1, 0)
    with pytest.raises(UserError, match="moe.init"):
        _module(teacher, 1, 4, moe={"init": "random"})
