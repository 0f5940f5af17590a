"""A training step reads nothing on the host in steady state: the counters are read once per
logging interval (on a GPU each read makes the host wait for the device)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmdistill.host_reads import HostReadCounter
from lmdistill.methods import MiniLMv1, MiniLMv2
from lmdistill.models import build_student, load_teacher

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rows(steps: int, batch: int = 4) -> list[dict]:
    ids = torch.randint(1000, 5000, (batch * steps, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0  # half of every batch padded: the padded path of the encoders too
    return [{"input_ids": x, "attention_mask": m} for x, m in zip(ids, mask, strict=True)]


@pytest.mark.parametrize("method", [MiniLMv2, MiniLMv1])
def test_steady_state_steps_read_nothing_and_each_interval_reads_once(method, tiny_teacher_dir,
                                                                      tmp_path):  # fmt: skip
    teacher = load_teacher(tiny_teacher_dir)
    student = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                            num_attention_heads=4, intermediate_size=64)  # fmt: skip
    kwargs = {"relation_heads": 4} if method is MiniLMv2 else {}
    module = method(teacher, student, **kwargs)
    module.freeze_unreached()
    counter = HostReadCounter(where=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=12, log_every_n_steps=5, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        gradient_clip_val=5.0, callbacks=[counter], default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(_rows(12), batch_size=4))
    reads = counter.per_step
    assert len(reads) == 12
    # step 0: the first flush (starts the throughput clock) and the first loss; then one read
    # at each logging step (global steps 5 and 10 are indices 4 and 9) and at the last step (its
    # partial interval), none otherwise
    assert reads[1:] == [0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1], counter.callers
    assert module.tokens_seen == int(sum(r["attention_mask"].sum() for r in _rows(12)))
    assert module.final_loss is not None and module.loss_first is not None


def test_minimoe_steady_state_steps_read_nothing(tiny_teacher_dir, tmp_path):
    """Routing, dispatch and balance loss of a MiniMoE student (2x4 experts) stay on the device;
    only logging steps read (the interval's counters and the per-layer routing figures)."""
    from lmdistill.methods import MiniMoE
    from lmdistill.models import MoESettings, moe_student

    teacher = load_teacher(tiny_teacher_dir)
    dense = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                          num_attention_heads=4, intermediate_size=64)  # fmt: skip
    moe = MoESettings(attention_experts=2, ffn_experts=4)
    module = MiniMoE(teacher, moe_student(dense, moe), moe.balance_weight, relation_heads=4)
    module.freeze_unreached()
    counter = HostReadCounter(where=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=12, log_every_n_steps=5, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        gradient_clip_val=5.0, callbacks=[counter], default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(_rows(12), batch_size=4))
    reads = counter.per_step
    logging = {4, 9, 11}  # global steps 5 and 10, and the last (its partial interval)
    assert [r for i, r in enumerate(reads) if i and i not in logging] == [0] * 8, counter.callers
    assert all(reads[i] >= 1 for i in logging)
