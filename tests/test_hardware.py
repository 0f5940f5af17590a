"""Machine-dependent settings: the default precision, compile backends, compiled layers."""

import lightning as L
import pytest
import torch
from cli_helpers import TINY, check_ok, run_cli, write_corpus
from torch.utils.data import DataLoader

from lmdistill import hardware
from lmdistill.errors import UserError
from lmdistill.methods import MiniLMv2
from lmdistill.models import build_student, load_teacher


def test_cpu_bf16_units_are_read_from_the_cpu_flags(tmp_path):
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert hardware.cpu_has_bf16(str(with_amx)) and not hardware.cpu_has_bf16(str(plain))
    assert not hardware.cpu_has_bf16(str(tmp_path / "missing"))


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "32")])
def test_auto_precision_follows_the_cpu(bf16, expected, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: bf16)
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.resolve_precision("16-mixed", "cpu") == "16-mixed"  # given: kept
    assert hardware.resolve_precision(32, "cpu") == "32"


def test_bad_precision_and_compile_settings_are_one_line_errors():
    with pytest.raises(UserError, match="unknown trainer.precision 'fp8'; use one of auto, 32"):
        hardware.resolve_precision("fp8")
    with pytest.raises(UserError, match="unknown compile=fast; use false, true"):
        hardware.compile_backend("fast")
    assert hardware.compile_backend(False) is None
    assert hardware.compile_backend(True) == "inductor"
    assert hardware.compile_backend("aot_eager") == "aot_eager"


def _losses(tiny_teacher_dir, tmp_path, backend):
    teacher = load_teacher(tiny_teacher_dir)
    torch.manual_seed(1)
    student = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                            num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip
    module = MiniLMv2(teacher, student, relation_heads=4)
    module.freeze_unreached()
    names = list(module.state_dict())
    if backend:
        module.compile_models(backend)
    ids = torch.randint(1000, 5000, (12, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    rows = [{"input_ids": x, "attention_mask": m} for x, m in zip(ids, mask, strict=True)]
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[Record()],
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(rows, batch_size=4))
    assert list(module.state_dict()) == names  # compiled in place: checkpoints and exports alike
    return losses


def test_compiled_layers_train_like_eager_ones(tiny_teacher_dir, tmp_path):
    eager = _losses(tiny_teacher_dir, tmp_path, None)
    compiled = _losses(tiny_teacher_dir, tmp_path, "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_switch_of_the_cli(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    args = [*TINY, f"data.paths=[{corpus}]", "trainer.max_steps=2", "compile=aot_eager",
            f"hydra.run.dir={out}"]  # fmt: skip
    check_ok(run_cli(args, tmp_path, tmp_path / "cache"))
    assert (out / "summary.json").is_file()
