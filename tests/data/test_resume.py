"""Exact mid-epoch resume: loader state, checkpoint loading with weights_only, real Trainer."""

import io

import lightning as L
import pytest
import torch
from corpora import make_documents, write_blank_line

from lmdistill.data import DataPositionCallback, PretrainingDataModule


@pytest.fixture
def resume_corpus(tmp_path) -> str:
    return write_blank_line(tmp_path / "c.txt", make_documents(30, seed=5))


def _dm(path, tokenizer_path, workers):
    dm = PretrainingDataModule(
        "text", tokenizer_path, paths=[path], batch_size=4, max_seq_length=24,
        shuffle_buffer=8, num_workers=workers, seed=3,
    )  # fmt: skip
    dm.setup()
    return dm


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [0, 3, 11])
def test_loader_resumes_exactly_after_prefetch(resume_corpus, tokenizer_path, workers, k):
    reference = [
        b["input_ids"] for b in _dm(resume_corpus, tokenizer_path, workers).train_dataloader()
    ]
    assert len(reference) > k + 5

    loader = _dm(resume_corpus, tokenizer_path, workers).train_dataloader()
    it = iter(loader)
    for _ in range(k + 1):  # Lightning pulls one batch ahead ...
        next(it)
    for _ in range(k):  # ... but only k batches were trained
        loader.mark_batch_consumed()
    state = loader.state_dict()
    # The state must survive a checkpoint loaded with weights_only=True.
    buffer = io.BytesIO()
    torch.save({"loader": state}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["loader"]
    del it

    fresh = _dm(resume_corpus, tokenizer_path, workers).train_dataloader()
    fresh.load_state_dict(state)
    rest = [b["input_ids"] for b in fresh]
    assert len(rest) == len(reference) - k
    for x, y in zip(rest, reference[k:], strict=False):
        assert torch.equal(x, y)
    # And the next epoch of the resumed loader equals the next epoch of an uninterrupted one.
    full = _dm(resume_corpus, tokenizer_path, workers).train_dataloader()
    list(full)
    nxt_ref = [b["input_ids"] for b in full]
    nxt = [b["input_ids"] for b in fresh]
    assert len(nxt) == len(nxt_ref) and all(
        torch.equal(x, y) for x, y in zip(nxt, nxt_ref, strict=False)
    )


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(int(batch["input_ids"].sum()))
        return (self.weight * batch["attention_mask"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(path, tokenizer_path, root, max_steps, ckpt_path=None, every=None):
    module = Recorder()
    callbacks = [DataPositionCallback()]
    if every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}"
            )
        )
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(every),
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, datamodule=_dm(path, tokenizer_path, 1), ckpt_path=ckpt_path)
    return module.seen


def test_trainer_resume_sees_every_batch_once(resume_corpus, tokenizer_path, tmp_path):
    # 30 documents give ~20 batches per epoch: 26 steps cross an epoch boundary.
    reference = _fit(resume_corpus, tokenizer_path, str(tmp_path / "a"), 26)
    first = _fit(resume_corpus, tokenizer_path, str(tmp_path / "b"), 7, every=7)
    ckpt = str(tmp_path / "b" / "step=7.ckpt")
    torch.load(ckpt, weights_only=True)  # what Lightning does
    second = _fit(resume_corpus, tokenizer_path, str(tmp_path / "c"), 26, ckpt_path=ckpt)
    assert len(first) == 7
    assert first + second == reference
