"""Validation of a method (`val/loss`) and the STS-B probe, against independent computations."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from lmdistill.data.validation import FixedBatches
from lmdistill.errors import UserError
from lmdistill.methods import MiniLMv2
from lmdistill.models import build_student, load_teacher
from lmdistill.probes import STSBProbe, load_probe_data, stsb_spearman

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")

_PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("The cat sleeps on the sofa.", "A dog runs in the park.", 0.4),
    ("Prices rose sharply in May.", "Prices went up a lot in May.", 4.0),
    ("She closed the window.", "The window was left open.", 1.5),
    ("Two children are playing football on the grass outside.", "Kids play soccer.", 4.0),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.8),
    ("The stock market fell today.", "A bird sits on a wire.", 0.0),
    ("A train arrives at the station.", "The train is pulling into the station.", 4.0),
    ("He is reading a book.", "A man reads.", 3.2),
]


def _write_stsb(path) -> str:
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    )
    rows = [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{s:.3f}\n"
            for i, (a, b, s) in enumerate(_PAIRS)]  # fmt: skip
    path.write_text(header + "".join(rows))
    return str(path)


def _spearman_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of average ranks (ties share their mean rank)."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def test_stsb_probe_matches_a_plain_reference(tiny_teacher_dir, tmp_path):
    model = AutoModel.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    data = load_probe_data(_write_stsb(tmp_path / "dev.tsv"), tokenizer, 128, batch_size=3)
    cosines = []
    with torch.no_grad():
        for a, b, _ in _PAIRS:  # each sentence alone: no padding at all
            pooled = [model(**tokenizer(s, return_tensors="pt")).last_hidden_state[0].mean(0)
                      for s in (a, b)]  # fmt: skip
            cosines.append(float(torch.nn.functional.cosine_similarity(*pooled, dim=0)))
    gold = np.array([s for _, _, s in _PAIRS])
    expected = _spearman_reference(np.array(cosines), gold)
    assert stsb_spearman(model, data) == pytest.approx(expected, abs=1e-6)
    assert len(data.batches) == 6  # 17 distinct sentences, 3 at a time (one sentence repeats)


def test_stsb_probe_reads_a_glue_folder_and_refuses_a_missing_file(tmp_path):
    (tmp_path / "STS-B").mkdir()
    _write_stsb(tmp_path / "STS-B" / "dev.tsv")
    assert STSBProbe(str(tmp_path)).path == tmp_path / "STS-B" / "dev.tsv"
    with pytest.raises(UserError, match="probe.stsb: .*nothing.tsv does not exist"):
        STSBProbe(str(tmp_path / "nothing.tsv"))


@pytest.mark.parametrize("prefix", ["", "assistant/"])
def test_stsb_probe_logs_the_teacher_under_the_method_prefix(prefix, tiny_teacher_dir, tmp_path):
    import contextlib

    model = AutoModel.from_pretrained(tiny_teacher_dir).eval()
    probe = STSBProbe(_write_stsb(tmp_path / "dev.tsv"))
    probe.data = load_probe_data(probe.path, AutoTokenizer.from_pretrained(tiny_teacher_dir), 128,
                                 batch_size=4)  # fmt: skip
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    trainer = SimpleNamespace(
        is_global_zero=True, callback_metrics={}, loggers=[logger], global_step=0,
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        lightning_module=SimpleNamespace(device="cpu"),
    )  # fmt: skip
    method = SimpleNamespace(teacher=SimpleNamespace(model=model), log_prefix=prefix)
    probe.on_train_start(trainer, method)
    expected = stsb_spearman(model, probe.data)
    name = prefix + "val/stsb_spearman_teacher"  # stage 1 of a teacher assistant: its own line
    assert logged == [({name: pytest.approx(expected)}, 0)]
    assert list(trainer.callback_metrics) == [name]


def test_stsb_probe_needs_validation(tmp_path):
    probe = STSBProbe(_write_stsb(tmp_path / "dev.tsv"))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(validates=False))
    with pytest.raises(UserError, match="validation is off; set data.val_batches > 0"):
        probe.setup(trainer, None, "fit")


def _qkv(model, layer: int, batch: dict) -> list[torch.Tensor]:
    """Q, K, V [B, L, d] of `layer` (0-based) of a full forward pass, via hooks."""
    attention, out = model.encoder.layer[layer].attention.self, {}
    handles = [getattr(attention, n).register_forward_hook(
        lambda _m, _i, o, n=n: out.setdefault(n, o)) for n in ("query", "key", "value")]  # fmt: skip
    model(**batch)
    for handle in handles:
        handle.remove()
    return [out["query"], out["key"], out["value"]]


def _minilm_v2_reference(teacher, student, batch, heads: int) -> torch.Tensor:
    """(KL_QQ + KL_KK + KL_VV) / 3, each the mean over real query rows of every relation head."""
    mask = batch["attention_mask"]
    t = _qkv(teacher, teacher.config.num_hidden_layers - 1, batch)
    s = _qkv(student, student.config.num_hidden_layers - 1, batch)

    def log_relations(x):
        b, n, d = x.shape
        xh = x.view(b, n, heads, d // heads).transpose(1, 2)  # [B, R, L, r]
        scores = xh @ xh.transpose(-1, -2) / (d // heads) ** 0.5  # [B, R, L, L]
        return scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")).log_softmax(-1)

    kls = []
    for xt, xs in zip(t, s, strict=True):
        lt, ls = log_relations(xt), log_relations(xs)
        kl = (lt.exp() * (lt - ls)).nan_to_num().sum(-1)  # [B, R, L]
        kls.append(kl[mask[:, None, :].expand_as(kl).bool()].mean())
    return sum(kls) / 3


def test_val_loss_is_the_mean_held_out_loss_in_eval_mode(tiny_teacher_dir, padded_batch):
    teacher = load_teacher(tiny_teacher_dir)
    torch.manual_seed(0)
    student = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                            num_attention_heads=4, intermediate_size=64,
                            hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)  # fmt: skip
    module = MiniLMv2(teacher, student, relation_heads=4)
    module.freeze_unreached()
    short = {k: v[1:, :7] for k, v in padded_batch.items()}
    batches = [padded_batch, short]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    rng = torch.get_rng_state()
    [logged] = trainer.validate(module, dataloaders=FixedBatches(batches), verbose=False)
    assert torch.equal(torch.get_rng_state(), rng)  # training's dropout stream is untouched

    reference_teacher = AutoModel.from_pretrained(tiny_teacher_dir).eval()
    student.eval()  # dropout off, as validation runs
    with torch.no_grad():
        losses = [_minilm_v2_reference(reference_teacher, student, b, 4) for b in batches]
    assert logged["val/loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)
    assert set(logged) == {"val/loss", "val/loss_qq", "val/loss_kk", "val/loss_vv"}
    assert module.summary_fields()["val_loss"] == pytest.approx(logged["val/loss"])
    assert module.tokens_seen == 0  # validation tokens are not counted as trained
    module.log_prefix = "assistant/"  # stage 1 of a teacher assistant: its own names, same figures
    [prefixed] = trainer.validate(module, dataloaders=FixedBatches(batches), verbose=False)
    assert prefixed == {f"assistant/{k}": v for k, v in logged.items()}
    assert module.summary_fields()["val_loss"] == pytest.approx(logged["val/loss"])


def test_cli_validates_at_the_interval_and_at_the_end_without_changing_training(
    tmp_path, cache_dir
):
    import json

    from cli_helpers import TINY, check_ok, read_metrics, run_cli, step_losses, write_corpus

    write_corpus(tmp_path / "corpus.txt")
    write_corpus(tmp_path / "heldout.txt", documents=20, seed=1)
    args = ["-m", *(a for a in TINY if not a.startswith("data.val_batches=")),
            f"data.paths=[{tmp_path / 'corpus.txt'}]", "trainer.max_steps=5",
            "data.val_batches=2", f"data.val_paths=[{tmp_path / 'heldout.txt'}]",
            f"probe.stsb={_write_stsb(tmp_path / 'dev.tsv')}",
            "trainer.val_check_interval=2,1000", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    check_ok(run_cli(args, tmp_path, cache_dir))  # one process: the two jobs share the imports
    [every_2] = (tmp_path / "sweep").glob("0_*")
    [at_end] = (tmp_path / "sweep").glob("1_*")

    rows = read_metrics(every_2 / "logs" / "metrics.csv")
    val = [r for r in rows if "val/loss" in r]
    # after optimizer steps 2 and 4 (val_check_interval) and 5 (the end); CSV steps count from 0
    assert [int(r["step"]) for r in val] == [1, 3, 4]
    assert all(-1 <= r["val/stsb_spearman"] <= 1 and "val/loss_qq" in r for r in val)
    [teacher] = [r["val/stsb_spearman_teacher"] for r in rows if "val/stsb_spearman_teacher" in r]
    summary = json.loads((every_2 / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(val[-1]["val/loss"])
    assert summary["val_stsb_spearman"] == pytest.approx(val[-1]["val/stsb_spearman"])
    assert summary["val_stsb_spearman_teacher"] == pytest.approx(teacher)
    assert summary["val_step"] == 5
    # validating draws no random numbers and reads only held-out files: training is the same,
    # and the same student gives the same figures at the end
    others = read_metrics(at_end / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in others if "val/loss" in r] == [4]
    assert step_losses(every_2 / "logs" / "metrics.csv") == step_losses(
        at_end / "logs" / "metrics.csv"
    )
    at_end_loss = json.loads((at_end / "summary.json").read_text())["val_loss"]
    assert at_end_loss == pytest.approx(summary["val_loss"], rel=1e-6)
