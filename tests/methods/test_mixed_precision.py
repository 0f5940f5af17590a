"""16-mixed with a gradient scaler, and non-finite losses, in a real Lightning Trainer.

Lightning runs `precision="16-mixed"` as bf16 on CPU, so the float16 path (autocast to float16
plus `GradScaler`) is built here by hand with Lightning's own `MixedPrecision` plugin, exactly as
it is used on a GPU.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lmdistill.methods import MiniLMv2
from lmdistill.methods.bookkeeping import NonFiniteLossError
from lmdistill.models import build_student, load_teacher
from lmdistill.safe_stop import CheckpointOnStop

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Snapshots(L.Callback):
    """The student's weights after every step, and each step's training_step output."""

    def __init__(self):
        self.weights, self.outputs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.clone() for k, v in pl_module.student.state_dict().items()})
        self.outputs.append(outputs)


class ScaleLoss(L.Callback):
    """Multiply the loss by `factor` at the given global steps."""

    def __init__(self, factor: float, steps: set[int]):
        self.factor, self.steps = factor, steps

    def on_fit_start(self, trainer, pl_module):
        combine = pl_module.combine
        pl_module.combine = lambda terms: (
            combine(terms) * (self.factor if trainer.global_step in self.steps else 1.0)
        )


def _module(tiny_teacher_dir, **optim):
    teacher = load_teacher(tiny_teacher_dir)
    torch.manual_seed(1)
    student = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                            num_attention_heads=4, intermediate_size=64)  # fmt: skip
    module = MiniLMv2(teacher, student, relation_heads=4, optim={"lr": 1e-3, **optim})
    module.freeze_unreached()
    return module


def _loader(steps: int) -> DataLoader:
    ids = torch.randint(1000, 5000, (4 * steps, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    return DataLoader(rows, batch_size=4)


def _trainer(steps: int, callbacks, tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                     default_root_dir=tmp_path, **kwargs)  # fmt: skip


def test_fp16_gradient_overflow_is_skipped_by_the_scaler_and_counted(tiny_teacher_dir, tmp_path):
    module = _module(tiny_teacher_dir)
    snapshots = Snapshots()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    overflow = ScaleLoss(1e38, {2})  # finite loss, but its float16 gradients overflow
    trainer = _trainer(5, [snapshots, overflow], tmp_path, plugins=[fp16])
    trainer.fit(module, _loader(5))
    w = snapshots.weights
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(w[1][name], w[0][name])  # ordinary steps update the weights
    assert all(torch.equal(w[2][k], w[1][k]) for k in w[1])  # the overflow step changed nothing
    assert not torch.equal(w[3][name], w[2][name])  # and training goes on
    assert scaler.get_scale() == 2.0**9  # halved once, by the overflow
    assert module.nonfinite_steps == 1
    assert trainer.callback_metrics["train/loss_scale"] == 2.0**9


def test_nonfinite_loss_skips_the_update(tiny_teacher_dir, tmp_path):
    module = _module(tiny_teacher_dir)
    snapshots = Snapshots()
    trainer = _trainer(4, [snapshots, ScaleLoss(float("nan"), {1})], tmp_path)
    trainer.fit(module, _loader(4))
    w = snapshots.weights
    assert all(torch.equal(w[1][k], w[0][k]) for k in w[0])
    assert not torch.equal(w[2]["embeddings.word_embeddings.weight"],
                           w[1]["embeddings.word_embeddings.weight"])  # fmt: skip
    losses = [float(out["loss"]) for out in snapshots.outputs]
    assert [loss != loss for loss in losses] == [False, True, False, False]  # NaN at step 1
    assert module.nonfinite_steps == 1 and trainer.global_step == 4


def test_consecutive_nonfinite_losses_stop_with_a_checkpoint_of_the_last_finite_state(
    tiny_teacher_dir, tmp_path
):
    module = _module(tiny_teacher_dir, max_nonfinite_steps=3)
    snapshots = Snapshots()
    trainer = _trainer(10, [snapshots, ScaleLoss(float("inf"), {2, 3, 4, 5, 6}), CheckpointOnStop()],
                       tmp_path, log_every_n_steps=1)  # the run is checked when counters are read  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        trainer.fit(module, _loader(10))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in snapshots.weights[1].items():  # the weights after the last finite step
        assert torch.equal(checkpoint["state_dict"][f"student.{key}"], value), key
    assert checkpoint["lmdistill"]["nonfinite_steps"] == 3
