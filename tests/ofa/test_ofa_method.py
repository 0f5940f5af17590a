"""method=ofa_minilm: the step's loss is the mean MiniLM v2 loss of the sampled sub-networks,
each equal to that of the carved dense student; what it freezes; a CLI run and its export."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModel

from lmdistill.errors import UserError
from lmdistill.export_subnet import main
from lmdistill.methods.ofa_minilm import OFAMiniLM
from lmdistill.models import build_student, load_teacher
from lmdistill.models.export import PROVENANCE_FILE
from lmdistill.models.ofa_export import dense_subnet

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
FAMILY = {"layers": [2, 1], "hidden": [32, 16]}


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


def _method(teacher, relation_heads: int = 4, dropout: float = 0.0, **kwargs) -> OFAMiniLM:
    torch.manual_seed(0)
    student = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                            num_attention_heads=4, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout)  # fmt: skip
    return OFAMiniLM(teacher, student, relation_heads=relation_heads, **kwargs)


def _kl(t, s, mask, heads):
    """Token-weighted mean over valid rows of KL(softmax(T T^T) || softmax(S S^T)), plain autograd."""

    def log_probs(x):
        b, n, d = x.shape
        r = d // heads
        xh = x.float().view(b, n, heads, r).transpose(1, 2)
        scores = (xh @ xh.transpose(-1, -2) / r**0.5).masked_fill(
            mask[:, None, None, :] == 0, float("-inf")
        )
        return torch.log_softmax(scores, -1)

    lt, ls = log_probs(t), log_probs(s)
    kl = (lt.exp() * (lt - ls)).nan_to_num().sum(-1)  # [B, R, L]
    return kl[mask[:, None, :].expand_as(kl).bool()].mean()


def _hooked(model, layer, batch):
    attention = model.encoder.layer[layer].attention.self
    out, handles = {}, []
    for name in ("query", "key", "value"):
        handles.append(getattr(attention, name).register_forward_hook(
            lambda _m, _i, o, name=name: out.setdefault(name, o)))  # fmt: skip
    model(**batch)
    for h in handles:
        h.remove()
    return out["query"], out["key"], out["value"]


@pytest.mark.parametrize("site", ["last_layer", "top_projection"])
def test_loss_is_the_mean_over_subnets_of_carved_students(teacher, padded_batch, site):
    method = _method(teacher, ofa={**FAMILY, "sampling": "all"}, relation_site=site)
    loss, terms = method.step_loss(padded_batch)
    assert method.student.active == (2, 32, 4, 128)  # restored to the full size
    mask = padded_batch["attention_mask"]
    with torch.no_grad():
        tq, tk, tv = _hooked(teacher.model, 1, padded_batch)
    expected = []
    for layers, hidden in [(2, 32), (2, 16), (1, 32), (1, 16)]:
        dense = dense_subnet(method.student, layers, hidden)
        if site == "last_layer":
            sq, sk, sv = _hooked(dense, layers - 1, padded_batch)
        else:
            states = dense(**padded_batch).last_hidden_state  # [B, L, h]
            w, b = method.relation_projection.weight, method.relation_projection.bias
            sq, sk, sv = (F.linear(states, w[i * 32 : i * 32 + hidden, :hidden],
                                   b[i * 32 : i * 32 + hidden]) for i in range(3))  # fmt: skip
        kls = [_kl(t, s, mask, 4) for t, s in ((tq, sq), (tk, sk), (tv, sv))]
        expected.append(sum(kls) / 3)
    torch.testing.assert_close(loss, sum(expected) / 4, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["loss_largest"], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["loss_smallest"], expected[-1], atol=1e-5, rtol=1e-5)


def test_a_step_is_decided_by_weights_rng_state_and_global_step(teacher, padded_batch, monkeypatch):
    """What a resume restores decides a step, dropout on: a second method with the same weights,
    at global step k with the RNG state the first had before its step k, computes the first's
    losses of steps k and k + 1 exactly (Lightning restoring them: tests/test_distill_cli.py)."""
    monkeypatch.setattr(OFAMiniLM, "global_step", property(lambda self: self.step))
    ofa = {"layers": [2, 1], "hidden": [32, 16, 8], "random_subnets": 1}
    first, second = (_method(teacher, dropout=0.1, ofa=ofa).train() for _ in range(2))
    torch.manual_seed(1)
    states, losses = [], []
    for step in range(4):
        states.append(torch.get_rng_state())
        first.step = step
        losses.append(first.step_loss(padded_batch)[0].detach())
    torch.set_rng_state(states[2])
    for step in (2, 3):
        second.step = step
        assert torch.equal(second.step_loss(padded_batch)[0].detach(), losses[step]), step
    assert first.sampler(2) != first.sampler(3)  # (seed 0: the random one differs)
    for step, state in ((3, states[2]), (2, states[3])):  # the step and the dropout masks count
        torch.set_rng_state(state)
        second.step = step
        assert not torch.equal(second.step_loss(padded_batch)[0].detach(), losses[2]), step


def test_freezes_what_no_subnet_reaches(teacher):
    last = _method(teacher, ofa=FAMILY, relation_site="last_layer")
    frozen = last.freeze_unreached()
    assert "student.pooler.dense.weight" in frozen
    assert "student.encoder.layer.1.output.dense.weight" in frozen
    assert not any(".layer.0." in name for name in frozen)
    top = _method(teacher, ofa=FAMILY)  # top_projection by default
    assert top.freeze_unreached() == ["student.pooler.dense.weight", "student.pooler.dense.bias"]


def test_relation_heads_must_divide_every_subnet(teacher):
    with pytest.raises(UserError, match="sub-network hidden size 8"):
        _method(teacher, ofa={"layers": [2], "hidden": [32, 8]}, relation_heads=16)


@pytest.mark.parametrize(
    "ofa, words",
    [
        ({"layers": [], "hidden": [32]}, r"ofa\.layers=\[\] is empty.*null"),
        ({"layers": [2], "hidden": []}, r"ofa\.hidden=\[\] is empty.*null"),
        ({"layers": [1.5], "hidden": [32]}, r"ofa\.layers=\[1\.5\].*1\.5 is not an integer"),
        ({"layers": [2], "hidden": [32, 16.0]}, r"ofa\.hidden=\[32, 16\.0\].*16\.0 is not"),
        ({"layers": [True], "hidden": [32]}, r"ofa\.layers=\[True\].*True is not an integer"),
        ({"layers": ["1"], "hidden": [32]}, r"ofa\.layers=\['1'\].*'1' is not an integer"),
        ({"layers": 2, "hidden": [32]}, r"ofa\.layers=2 is not a list.*\[2\]"),
    ],
)
def test_family_values_are_integers_in_non_empty_lists(teacher, ofa, words):
    """Each would have trained another family than the one given (the student's full size for
    an empty list, l=1 for 1.5 or True) or crashed (a scalar)."""
    with pytest.raises(UserError, match=words) as err:
        _method(teacher, ofa=ofa)
    assert "\n" not in str(err.value)
    assert _method(teacher, ofa={"layers": None, "hidden": None}).student.config.family() == [
        (2, 32)
    ]  # null: the student's own size


def _cli_args(tmp_path, out, *extra) -> list[str]:
    from cli_helpers import TINY, write_corpus

    write_corpus(tmp_path / "corpus.txt")
    return [*TINY, f"data.paths=[{tmp_path / 'corpus.txt'}]", "method=ofa_minilm",
            "ofa.layers=[2,1]", "ofa.hidden=[32,16]", "ofa.random_subnets=1",
            "trainer.max_steps=2", *extra, f"hydra.run.dir={out}"]  # fmt: skip


def test_cli_trains_exports_and_summarises(tmp_path, cache_dir):
    from cli_helpers import check_ok, run_cli

    out = tmp_path / "run"
    check_ok(run_cli(_cli_args(tmp_path, out, "ofa.export=[[2,32],[1,16]]"), tmp_path, cache_dir))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ofa"]["subnets_per_step"] == 3 and len(summary["ofa"]["subnets"]) == 4
    assert (
        json.loads((out / "student" / "config.json").read_text())["model_type"] == "lmdistill-ofa"
    )
    # ofa.export: exported after training, listed in the summary, plain BERTs
    assert summary["subnet_exports"] == {
        name: str(out / "subnets" / name) for name in ("L2-H32", "L1-H16")
    }
    for name, (layers, hidden) in {"L2-H32": (2, 32), "L1-H16": (1, 16)}.items():
        dense = AutoModel.from_pretrained(out / "subnets" / name)
        assert type(dense).__name__ == "BertModel"
        assert (dense.config.num_hidden_layers, dense.config.hidden_size) == (layers, hidden)
        record = json.loads((out / "subnets" / name / PROVENANCE_FILE).read_text())
        assert record["supernet_dir"] == str((out / "student").resolve())
        assert record["subnet"]["in_family"] and record["steps"] == 2
    main([str(out), "2", "16"])  # lmdistill-export-subnet (its CLI runs in test_ofa_export.py)
    dense = AutoModel.from_pretrained(out / "subnets" / "L2-H16")
    assert type(dense).__name__ == "BertModel" and dense.config.hidden_size == 16


def test_cli_impossible_export_is_one_error_line_before_training(tmp_path, cache_dir):
    from cli_helpers import run_cli
    from test_distill_errors import _assert_one_error_line

    out = tmp_path / "run"
    args = _cli_args(tmp_path, out, "ofa.export=[[2,32],[3,32]]")
    code, _, stderr = run_cli(args, tmp_path, cache_dir, timeout=120)
    _assert_one_error_line(code, stderr, "ofa.export", "l=3", "2-layer")
    assert not (out / "checkpoints").exists() and not (out / "student").exists()


def test_existing_subnets_are_not_overwritten(tmp_path):
    from lmdistill.pipeline import check_fresh_output

    (tmp_path / "subnets" / "L1-H16").mkdir(parents=True)
    with pytest.raises(UserError, match="subnets already exists"):
        check_fresh_output(tmp_path, tmp_path / "student")
    check_fresh_output(tmp_path, None)  # no export at all: nothing written there


def test_export_pairs_are_checked(teacher):
    for bad, words in [([[2, 48]], "h=48"), ([[2]], "not an \\[l, h\\] pair"),
                       ([[1, 16], [1, 16]], "twice")]:  # fmt: skip
        with pytest.raises(UserError, match=words):
            _method(teacher, ofa={**FAMILY, "export": bad})
    assert _method(teacher, ofa={**FAMILY, "export": [[1, 16]]}).export == [(1, 16)]
    with pytest.raises(UserError, match="ofa.export needs export=true"):
        _method(teacher, ofa={**FAMILY, "export": [[1, 16]]}, export_student=False)


def test_export_outside_the_family_is_named_in_a_warning(teacher, caplog):
    """As `lmdistill-export-subnet` notes it: the sub-network is exported but was not trained."""
    with caplog.at_level("WARNING", logger="lmdistill"):
        assert _method(teacher, ofa={**FAMILY, "export": [[2, 32], [1, 24]]}).export == [
            (2, 32), (1, 24)
        ]  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "ofa.export [1, 24] is not in the trained family [2, 1] x [32, 16]: it is exported but "
        "not trained for"
    ]


def test_a_supernet_student_takes_the_method_family(teacher):
    from lmdistill.models.ofa_student import ofa_student

    student = ofa_student(teacher, num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
    method = OFAMiniLM(teacher, student, ofa=FAMILY, relation_heads=4)
    assert method.student is student and student.config.family() == [
        (2, 32), (2, 16), (1, 32), (1, 16)
    ]  # fmt: skip
    assert student.config._attn_implementation == "sdpa"


def test_a_supernet_student_refuses_experts(teacher):
    from lmdistill.models.ofa_student import ofa_student

    with pytest.raises(UserError, match="super-nets are dense; use moe=1x1"):
        ofa_student(teacher, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                    moe={"attention_experts": 1, "ffn_experts": 4})  # fmt: skip
    dense = {"attention_experts": 1, "ffn_experts": 1}
    assert ofa_student(teacher, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                       moe=dense).config.hidden_size == 32  # fmt: skip
