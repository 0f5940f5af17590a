"""MiniLM v1/v2 LightningModules against independent plain-torch computations."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel

from lmdistill.errors import UserError
from lmdistill.methods import MiniLMv1, MiniLMv2
from lmdistill.models import build_student, load_teacher

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


def _student(teacher, layers=2, hidden=32, heads=4):
    torch.manual_seed(0)
    shape = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads}
    return build_student(teacher.config, **shape, intermediate_size=2 * hidden,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def _built(module):
    """The method as the pipeline builds it: unreachable parameters frozen."""
    module.freeze_unreached()
    return module


def _hooked_qkv(model, layer_index, batch):
    """Q/K/V of one layer of a full model run, via hooks on its Linear modules (independent)."""
    attention = model.encoder.layer[layer_index].attention.self
    out, handles = {}, []
    for name in ("query", "key", "value"):
        handles.append(getattr(attention, name).register_forward_hook(
            lambda _m, _i, o, name=name: out.setdefault(name, o)))  # fmt: skip
    model(**batch)
    for h in handles:
        h.remove()
    return out["query"], out["key"], out["value"]


def _kl_reference(t_left, t_right, s_left, s_right, mask, heads):
    """Token-weighted mean over valid rows of KL(softmax(T) || softmax(S)), plain autograd."""

    def log_probs(left, right):
        b, n, d = left.shape
        r = d // heads
        lh = left.float().view(b, n, heads, r).transpose(1, 2)
        rh = right.float().view(b, n, heads, r).transpose(1, 2)
        scores = lh @ rh.transpose(-1, -2) / r**0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return torch.log_softmax(scores, -1)

    lt, ls = log_probs(t_left, t_right), log_probs(s_left, s_right)
    kl = (lt.exp() * (lt - ls)).nan_to_num().sum(-1)  # [B, R, L]
    rows = mask[:, None, :].expand_as(kl).bool()
    return kl[rows].mean()


def test_last_layer_site_freezes_exactly_the_unreached_top(teacher):
    module = _built(MiniLMv2(teacher, _student(teacher), relation_heads=4))
    top = "student.encoder.layer.1."
    expected = {n for n, _ in module.named_parameters()
                if n.startswith("student.pooler.") or (n.startswith(top) and ".attention.self." not in n)}  # fmt: skip
    assert set(module.frozen_parameters) == expected
    assert any(
        n.startswith(top + "attention.self.query")
        for n, p in module.named_parameters()
        if p.requires_grad
    )


def test_every_trainable_parameter_gets_a_gradient(teacher, padded_batch):
    """No unused parameters: DDP needs no find_unused_parameters."""
    for site in ("last_layer", "top_projection"):
        module = _built(MiniLMv2(teacher, _student(teacher), relation_heads=4, relation_site=site))
        module.training_step(padded_batch, 0).backward()
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], site


def test_top_projection_trains_every_layer_and_is_not_part_of_the_student(teacher):
    module = _built(
        MiniLMv2(teacher, _student(teacher), relation_heads=4, relation_site="top_projection")
    )
    assert all(n.startswith("student.pooler.") for n in module.frozen_parameters)
    assert module.relation_projection.weight.shape == (96, 32)
    assert not any("relation_projection" in n for n, _ in module.student.named_parameters())


def test_minilm_v2_loss_equals_independent_computation(teacher, tiny_teacher_dir, padded_batch):
    student = _student(teacher)
    module = MiniLMv2(
        teacher, student, relation_heads=4, relation_weights={"qq": 1, "kk": 2, "vv": 3}
    )
    loss = module.training_step(padded_batch, 0)

    full_teacher = AutoModel.from_pretrained(tiny_teacher_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        tq, tk, tv = _hooked_qkv(full_teacher, 1, padded_batch)
    sq, sk, sv = _hooked_qkv(student, 1, padded_batch)
    mask = padded_batch["attention_mask"]
    terms = [_kl_reference(t, t, s, s, mask, 4) for t, s in ((tq, sq), (tk, sk), (tv, sv))]
    expected = (terms[0] + 2 * terms[1] + 3 * terms[2]) / 6
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_minilm_v1_loss_is_attention_transfer_plus_value_relation(
    teacher, tiny_teacher_dir, padded_batch
):
    """AT from the models' own eager attention probabilities, VR from V V^T: an independent check."""
    student = _student(teacher)
    module = MiniLMv1(teacher, student)
    loss = module.training_step(padded_batch, 0)

    mask = padded_batch["attention_mask"]
    full_teacher = AutoModel.from_pretrained(tiny_teacher_dir, attn_implementation="eager").eval()
    eager_student = AutoModel.from_config(student.config, attn_implementation="eager").eval()
    eager_student.load_state_dict(student.state_dict())
    with torch.no_grad():
        t_att = full_teacher(**padded_batch, output_attentions=True).attentions[-1]  # [B, A, L, L]
        s_att = eager_student(**padded_batch, output_attentions=True).attentions[-1]
        _, _, tv = _hooked_qkv(full_teacher, 1, padded_batch)
        _, _, sv = _hooked_qkv(eager_student, 1, padded_batch)
    kl = (t_att * (t_att.clamp_min(1e-30).log() - s_att.clamp_min(1e-30).log())).sum(-1)
    at = kl[mask[:, None, :].expand_as(kl).bool()].mean()
    vr = _kl_reference(tv, tv, sv, sv, mask, 4)
    torch.testing.assert_close(loss.detach(), at + vr, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_terms_are_float32_under_autocast(teacher, padded_batch, dtype):
    module = MiniLMv2(teacher, _student(teacher), relation_heads=4)
    with torch.autocast("cpu", dtype=dtype):
        terms = module.loss_terms(module.teacher_qkv(padded_batch), module.student_qkv(padded_batch),
                                  padded_batch["attention_mask"])  # fmt: skip
    assert all(t.dtype == torch.float32 for t in terms.values())


def test_optimizer_groups_and_linear_schedule(teacher):
    module = _built(MiniLMv2(teacher, _student(teacher), relation_heads=4,
                             optim={"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 10}))  # fmt: skip
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = module.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    scheduler = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx(0.5e-3)
    assert scheduler.get_last_lr()[0] == 0.0


def test_unknown_step_count_is_a_user_error(teacher):
    module = MiniLMv2(teacher, _student(teacher), relation_heads=4)
    module._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(UserError, match="trainer.max_steps"):
        module.configure_optimizers()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda t, s: MiniLMv2(t, s, relation_heads=3),
            r"relation_heads=3 does not divide the teacher hidden size 32",
        ),
        (
            lambda t, s: MiniLMv2(t, s, relation_heads=4, reduction="sum"),
            "unknown method.reduction 'sum'",
        ),
        (
            lambda t, s: MiniLMv2(t, s, relation_heads=4, relation_weights={"qk": 1}),
            r"relation_weights has unknown terms \['qk'\]; the terms are qq, kk and vv",
        ),
        (
            lambda t, s: MiniLMv2(
                t, s, relation_heads=4, relation_weights={"qq": 0, "kk": 0, "vv": 0}
            ),  # fmt: skip
            "with a positive sum",
        ),
        (
            lambda t, s: MiniLMv2(t, s, relation_heads=4, relation_site="middle"),
            "relation_site 'middle'",
        ),
    ],
)
def test_bad_method_settings(teacher, make, message):
    with pytest.raises(UserError, match=message):
        make(teacher, _student(teacher))


def test_v2_relation_heads_must_divide_the_student_too(teacher):
    with pytest.raises(UserError, match="student hidden size 24"):
        MiniLMv2(teacher, _student(teacher, hidden=24, heads=4), relation_heads=16)


def test_v1_needs_equal_head_counts(teacher):
    with pytest.raises(
        UserError, match=r"same number of attention heads in teacher \(4\) and student \(2\)"
    ):
        MiniLMv1(teacher, _student(teacher, heads=2))
