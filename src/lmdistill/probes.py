"""A training-free quality probe: STS-B dev, Spearman of gold scores against embedding cosines.

For every sentence pair of an STS-B dev TSV (GLUE format: sentences in columns 8 and 9, the
score in the last column), each sentence is embedded alone as the attention-masked mean of the
model's last hidden states; the probe is the Spearman rank correlation (torchmetrics) between
the gold scores and the cosine similarity of the pair's embeddings. Nothing is trained: it
tracks how much sentence-level meaning the student's representation keeps.

`STSBProbe` (a Lightning callback, `probe.stsb` in conf/distill.yaml) logs the student's as
`val/stsb_spearman` at every validation and the teacher's (the teacher as distilled: its layers up
to `teacher.layer`) once at the start of training as `val/stsb_spearman_teacher`, a reference.
The student is embedded as it is validated (eval mode; a once-for-all super-net as its largest
sub-network). Global rank 0 computes and logs it; the other ranks go on to the next collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.nn import functional as F
from torchmetrics.functional.regression import spearman_corrcoef

from lmdistill.data.datamodule import load_tokenizer
from lmdistill.errors import UserError
from lmdistill.glue.tasks import get_task
from lmdistill.glue.tsv import read_tsv
from lmdistill.losses import RelationPlan
from lmdistill.methods.base import encoder_mask, model_inputs


@dataclass(frozen=True)
class ProbeData:
    """Tokenized unique sentences in batches (sorted by length) and the pairs that use them."""

    batches: list[dict[str, torch.Tensor]]  # input_ids, attention_mask, token_type_ids: [b, l]
    order: torch.Tensor  # [N] sentence index of each row of the concatenated batches
    first: torch.Tensor  # [P] sentence index of each pair's first sentence
    second: torch.Tensor  # [P] sentence index of each pair's second sentence
    scores: torch.Tensor  # [P] float64 gold similarity


def stsb_file(path: str | Path) -> Path:
    """The STS-B dev TSV: `path` itself, or `<path>/STS-B/dev.tsv` for a GLUE folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "STS-B" / "dev.tsv"
    if not path.is_file():
        raise UserError(
            f"probe.stsb: {path} does not exist; give the STS-B dev TSV (GLUE format) or a GLUE "
            "folder holding STS-B/dev.tsv, or probe.stsb=null"
        )
    return path


def load_probe_data(path: str | Path, tokenizer, max_seq_length: int, batch_size: int) -> ProbeData:
    """Read the pairs of an STS-B TSV and tokenize each distinct sentence once."""
    examples = read_tsv(stsb_file(path), get_task("stsb"))
    index: dict[str, int] = {}
    for example in examples:
        for text in example.texts:
            index.setdefault(text, len(index))
    sentences = list(index)
    encoded = tokenizer(sentences, truncation=True, max_length=max_seq_length)["input_ids"]
    order = sorted(range(len(sentences)), key=lambda i: len(encoded[i]))  # little padding
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        padded = tokenizer.pad({"input_ids": rows}, return_tensors="pt")  # [b, l]: longest last
        ids = padded["input_ids"]
        batches.append({"input_ids": ids, "attention_mask": padded["attention_mask"],
                        "token_type_ids": torch.zeros_like(ids)})  # fmt: skip
    return ProbeData(
        batches=batches,
        order=torch.tensor(order),
        first=torch.tensor([index[e.texts[0]] for e in examples]),
        second=torch.tensor([index[e.texts[1]] for e in examples]),
        scores=torch.tensor([float(e.label) for e in examples], dtype=torch.float64),
    )


@torch.no_grad()
def mean_pooled(model, batches: list[dict], device: torch.device) -> torch.Tensor:
    """[N, d] float32: attention-masked mean of `model`'s last hidden states, rows in batch order."""
    was_training = model.training
    model.eval()
    try:
        pooled = []
        for batch in batches:
            mask = batch["attention_mask"]  # [b, l] on the host
            inputs = {k: v.to(device) for k, v in model_inputs(batch, model.config).items()}
            inputs["attention_mask"] = encoder_mask(model, inputs["attention_mask"],
                                                    RelationPlan.of(mask))  # fmt: skip
            hidden = model(**inputs).last_hidden_state.float()  # [b, l, d]
            weights = mask.to(device, torch.float32)[:, :, None]  # [b, l, 1]
            pooled.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))  # [b, d]
        return torch.cat(pooled)
    finally:
        model.train(was_training)


def stsb_spearman(model, data: ProbeData, device: torch.device | str = "cpu") -> float:
    """Spearman correlation of gold scores with the cosines of mean-pooled embeddings."""
    rows = mean_pooled(model, data.batches, torch.device(device)).cpu().double()  # [N, d]
    embeddings = torch.empty_like(rows)
    embeddings[data.order] = rows  # back to sentence order
    cosine = F.cosine_similarity(embeddings[data.first], embeddings[data.second], dim=-1)  # [P]
    return float(spearman_corrcoef(cosine, data.scores))


class STSBProbe(L.Callback):
    """`val/stsb_spearman` at every validation, `val/stsb_spearman_teacher` at the start.

    path: STS-B dev TSV or GLUE folder (None: the probe is off); tokenizer: None for the data's
    (the teacher's, which the student shares); sentences are truncated to `max_seq_length`,
    embedded `batch_size` at a time.
    """

    def __init__(self, path: str | None, tokenizer: str | None = None, batch_size: int = 128,
                 max_seq_length: int = 128):  # fmt: skip
        self.path = stsb_file(path) if path else None  # a missing file fails before training
        if batch_size < 1 or max_seq_length < 2:
            raise UserError(
                f"probe.batch_size={batch_size} and probe.max_seq_length={max_seq_length} must "
                "be at least 1 and 2"
            )
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.data: ProbeData | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.path is None or stage != "fit":
            return
        data = trainer.datamodule
        data = getattr(data, "data", data)  # a wrapper's (teacher assistant: StagedData)
        if not getattr(data, "validates", False):
            raise UserError(
                "probe.stsb runs at every validation but validation is off; set "
                "data.val_batches > 0, or probe.stsb=null"
            )
        if self.data is None:
            tokenizer = load_tokenizer(self.tokenizer or data.tokenizer_name)
            self.data = load_probe_data(self.path, tokenizer, self.max_seq_length,
                                        self.batch_size)  # fmt: skip

    def _spearman(self, trainer, model) -> float:
        with trainer.precision_plugin.forward_context():
            return stsb_spearman(model, self.data, trainer.lightning_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.data is None or not trainer.is_global_zero:
            return
        value = self._spearman(trainer, pl_module.teacher.model)
        # under the module's prefix, as its `log` (stage 1 of a teacher assistant: assistant/)
        name = pl_module.log_prefix + "val/stsb_spearman_teacher"
        trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:  # Lightning's `log` is not open in on_train_start
            logger.log_metrics({name: value}, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.data is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = self._spearman(trainer, pl_module.student)
        pl_module.log("val/stsb_spearman", value, rank_zero_only=True)
