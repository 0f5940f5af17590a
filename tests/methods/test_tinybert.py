"""TinyBERT general distillation against an independent plain-torch computation, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cli_helpers import TINY, check_ok, run_cli, step_figures, write_corpus
from transformers import AutoModel

from lmdistill.errors import UserError
from lmdistill.methods.tinybert import TinyBERT
from lmdistill.models import build_student, load_teacher

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


def _student(teacher, layers=2, hidden=16, heads=4):
    torch.manual_seed(0)
    return build_student(teacher.config, num_hidden_layers=layers, hidden_size=hidden,
                         num_attention_heads=heads, intermediate_size=2 * hidden,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def _reference(model, batch):
    """Hidden states (output_hidden_states) and Q K^T / sqrt(a) from hooks on Q/K, full model."""
    heads, scores, handles = model.config.num_attention_heads, {}, []
    for i, layer in enumerate(model.encoder.layer, start=1):
        out = {}
        for name in ("query", "key"):
            handles.append(getattr(layer.attention.self, name).register_forward_hook(
                lambda _m, _i, o, name=name, out=out: out.__setitem__(name, o)))  # fmt: skip
        scores[i] = out
    hidden = model(**batch, output_hidden_states=True).hidden_states  # (L + 1) x [B, L, d]
    for h in handles:
        h.remove()
    result = {}
    for i, out in scores.items():
        b, n, d = out["query"].shape
        q = out["query"].view(b, n, heads, d // heads).permute(0, 2, 1, 3)
        k = out["key"].view(b, n, heads, d // heads).permute(0, 2, 1, 3)
        result[i] = torch.einsum("bhid,bhjd->bhij", q, k) / (d // heads) ** 0.5
    return hidden, result


def _expected(module, teacher_dir, batch, mapping):
    full = AutoModel.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        t_hidden, t_scores = _reference(full, batch)
    s_hidden, s_scores = _reference(module.student, batch)
    w = module.projection
    m = batch["attention_mask"].float()  # [B, L]
    pairs = m[:, None, :, None] * m[:, None, None, :]  # [B, 1, L, L]

    def hidden(s, t):
        return (((w(s) - t) ** 2).sum(-1) * m).sum() / (m.sum() * t.shape[-1])

    def scores(s, t):
        return (((s - t) ** 2) * pairs).sum() / (pairs.sum() * s.shape[1])

    emb = hidden(s_hidden[0], t_hidden[0])
    hid = sum(hidden(s_hidden[i], t_hidden[t]) for i, t in enumerate(mapping, 1))
    att = sum(scores(s_scores[i], t_scores[t]) for i, t in enumerate(mapping, 1))
    return emb, hid, att


@pytest.mark.parametrize(("layers", "mapping", "expected_mapping"),
                         [(2, None, [1, 2]), (1, None, [2]), (2, [2, 2], [2, 2])])  # fmt: skip
def test_loss_equals_independent_computation(teacher, tiny_teacher_dir, padded_batch, layers,
                                             mapping, expected_mapping):  # fmt: skip
    module = TinyBERT(teacher, _student(teacher, layers=layers), layer_mapping=mapping)
    module.freeze_unreached()
    assert module.layer_mapping == expected_mapping
    loss, terms = module.step_loss(padded_batch)
    emb, hid, att = _expected(module, tiny_teacher_dir, padded_batch, expected_mapping)
    torch.testing.assert_close(terms["embeddings"], emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(terms["hidden"], hid, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(terms["attention"], att, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, emb + hid + att, atol=1e-5, rtol=1e-4)


def test_padded_keys_and_queries_do_not_count(teacher, padded_batch):
    module = TinyBERT(teacher, _student(teacher))
    loss, _ = module.step_loss(padded_batch)
    changed = {k: v.clone() for k, v in padded_batch.items()}
    changed["input_ids"][changed["attention_mask"] == 0] = 4242  # other tokens where padded
    torch.testing.assert_close(module.step_loss(changed)[0], loss)


def test_the_projection_and_every_layer_train_and_only_the_pooler_is_frozen(teacher, padded_batch):
    module = TinyBERT(teacher, _student(teacher))
    frozen = module.freeze_unreached()
    assert frozen and all(n.startswith("student.pooler.") for n in frozen)
    assert module.projection.weight.shape == (32, 16)  # Linear(d_s, d_t)
    module.step_loss(padded_batch)[0].backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_teacher_computes_only_the_mapped_layers(tiny_teacher_dir, padded_batch):
    teacher = load_teacher(tiny_teacher_dir, layer=1)  # teacher.layer=1: layers above never built
    module = TinyBERT(teacher, _student(teacher, layers=2))
    assert module.layer_mapping == [1, 1] and module.teacher_request().top_layer == 1
    features = module.teacher_features(padded_batch)
    assert set(features.hidden) == {0, 1} and set(features.scores) == {1}
    assert features.hidden[1].is_inference()


@pytest.mark.parametrize(("kwargs", "student", "message"), [
    ({}, {"heads": 2}, r"teacher has 4 heads, the student 2; set student.num_attention_heads=4"),
    ({"layer_mapping": [1, 3]}, {}, r"layer_mapping=\[1, 3\] must give one teacher layer in 1..2"),
    ({"layer_mapping": [1]}, {}, r"each of the 2 student layers"),
    ({"layer_mapping": 2}, {}, r"layer_mapping=2 must give one teacher layer"),
    ({"layer_mapping": [1, "2"]}, {}, r"layer_mapping=\[1, '2'\] must give one teacher layer"),
    ({"relation_site": "last_layer"}, {}, r"remove student.relation_site=last_layer"),
])  # fmt: skip
def test_bad_settings_are_one_line_errors(teacher, kwargs, student, message):
    with pytest.raises(UserError, match=message) as info:
        TinyBERT(teacher, _student(teacher, **student), **kwargs)
    assert "\n" not in str(info.value)


RUN = ["method=tinybert", "student.hidden_size=16", "trainer.max_steps=3"]  # a projection


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cache_dir):
    """3 steps (dropout on), every step's checkpoint kept."""
    work = tmp_path_factory.mktemp("tinybert-cli")
    write_corpus(work / "corpus.txt")
    out = work / "run"
    check_ok(run_cli([*TINY, *RUN, f"data.paths=[{work / 'corpus.txt'}]",
                      "callbacks.model_checkpoint.every_n_train_steps=1",
                      "callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={out}"],
                     work, cache_dir))  # fmt: skip
    return out


def test_cli_resume_continues_exactly(cli_run, cache_dir, tmp_path):
    """From step 1: the uninterrupted run's loss terms (projection, AdamW state, RNG restored)."""
    out, work = tmp_path / "resumed", cli_run.parent
    step1 = cli_run / "checkpoints" / "epoch=0-step=1.ckpt"
    check_ok(run_cli([*TINY, *RUN, f"data.paths=[{work / 'corpus.txt'}]", f"ckpt_path='{step1}'",
                      f"hydra.run.dir={out}"], work, cache_dir))  # fmt: skip
    full = step_figures(cli_run / "logs" / "metrics.csv")
    resumed = step_figures(out / "logs" / "metrics.csv")
    assert sorted(resumed) == [1, 2] and "train/loss_attention" in resumed[1]
    for step, figures in resumed.items():
        assert figures == pytest.approx(full[step], rel=1e-6, abs=0), step


def test_cli_exports_an_ordinary_hugging_face_student(cli_run):
    out = cli_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tinybert" and summary["layer_mapping"] == [1, 2]
    assert summary["steps"] == 3 and summary["final_loss"] is not None
    provenance = json.loads((out / "student" / "lmdistill_provenance.json").read_text())
    assert provenance["layer_mapping"] == [1, 2]
    assert provenance["untrained_parameters"] == ["student.pooler.dense.weight",
                                                  "student.pooler.dense.bias"]  # fmt: skip
    code = ("import sys; from transformers import AutoModel; "
            f"m = AutoModel.from_pretrained({str(out / 'student')!r}); "
            "assert type(m).__name__ == 'BertModel' and m.config.hidden_size == 16; "
            "assert not any(k.startswith('lmdistill') for k in sys.modules); print('ok')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
