"""The GLUE DataModule: examples from local TSV files or the hub, tokenized once, padded per batch.

train: [Example] --tokenizer (pairs as two segments, truncated to max_seq_length)--> features
  --> DataLoader (shuffled) --> DataCollatorWithPadding --> {input_ids, attention_mask,
      token_type_ids, labels}  # [B, longest in batch]
dev:   the same, unshuffled, one loader per dev split (MNLI: matched, mismatched)
"""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lmdistill.errors import UserError
from lmdistill.glue.tasks import TaskSpec
from lmdistill.glue.tsv import Example, read_tsv, task_file


class GlueDataModule(L.LightningDataModule):
    def __init__(
        self,
        task: TaskSpec,
        tokenizer: PreTrainedTokenizerBase,
        glue_dir: str | None = None,
        hf_path: str = "nyu-mll/glue",
        max_seq_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        train_limit: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.glue_dir = glue_dir
        self.hf_path = hf_path
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_limit = train_limit
        self.num_workers = num_workers
        self.seed = seed
        self.collate = DataCollatorWithPadding(tokenizer)
        self.train: list[dict] | None = None
        self.dev: dict[str, list[dict]] = {}

    # --- reading ----------------------------------------------------------------------------

    def read_split(self, split: str) -> list[Example]:
        """Examples of `train` or a dev split name (`dev`, `matched`, ...)."""
        if split == "train":
            stem, hf_split = "train", "train"
        else:
            stem, hf_split = next((s, h) for name, s, h in self.task.dev_splits if name == split)
        if self.glue_dir is not None:
            return read_tsv(task_file(self.glue_dir, self.task, stem), self.task)
        return self._read_hub(hf_split)

    def _read_hub(self, hf_split: str) -> list[Example]:
        import datasets

        try:
            data = datasets.load_dataset(self.hf_path, self.task.name, split=hf_split)
        except Exception as err:  # noqa: BLE001 - offline, unknown name, no network
            raise UserError(
                f"could not load {self.hf_path}/{self.task.name} ({type(err).__name__}); "
                "set data.glue_dir to a folder of GLUE TSV files, or allow hub access"
            ) from err
        cast = float if self.task.is_regression else int
        columns = [data[field] for field in self.task.hf_fields]
        return [
            Example(tuple(texts), cast(label))
            for *texts, label in zip(*columns, data["label"], strict=True)
        ]

    def subsample(self, examples: list[Example]) -> list[Example]:
        """The first `train_limit` examples of a seeded shuffle, in file order (deterministic)."""
        if self.train_limit is None or self.train_limit >= len(examples):
            return examples
        keep = sorted(random.Random(self.seed).sample(range(len(examples)), self.train_limit))
        return [examples[i] for i in keep]

    def tokenize(self, examples: list[Example]) -> list[dict]:
        columns = list(zip(*(e.texts for e in examples), strict=True))
        encoded = self.tokenizer(
            *columns, truncation=True, max_length=self.max_seq_length, padding=False
        )
        cast = float if self.task.is_regression else int  # the collator makes float / long
        keys = list(encoded.keys())
        return [
            {**{k: encoded[k][i] for k in keys}, "labels": cast(e.label)}
            for i, e in enumerate(examples)
        ]

    # --- Lightning hooks ---------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.train is None:
            self.train = self.tokenize(self.subsample(self.read_split("train")))
            self.dev = {
                name: self.tokenize(self.read_split(name)) for name, _, _ in self.task.dev_splits
            }

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, generator=generator,
            collate_fn=self.collate, num_workers=self.num_workers,
        )  # fmt: skip

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                features,
                batch_size=self.eval_batch_size,
                collate_fn=self.collate,
                num_workers=self.num_workers,
            )  # fmt: skip
            for features in self.dev.values()
        ]
