"""The validation split: held-out documents are never trained on, the batches are fixed, DDP
ranks get disjoint equal shares, and bad settings stop with one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from corpora import make_documents, write_blank_line

from lmdistill.data import PretrainingDataModule
from lmdistill.data.sample import ensure_sample_corpus
from lmdistill.data.validation import FixedBatches
from lmdistill.errors import UserError

N = 8  # n-gram length: documents of random words share no 8 tokens by chance


def _module(tokenizer_path, tmp_path, **kwargs) -> PretrainingDataModule:
    args = dict(source="text", tokenizer=tokenizer_path, batch_size=4, max_seq_length=32,
                shuffle_buffer=0, num_workers=0, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    return PretrainingDataModule(**{**args, **kwargs})


def _segments(input_ids: list[int], special: set[int]) -> list[list[int]]:
    """The runs of non-special tokens of a sequence (segments A and B)."""
    runs, run = [], []
    for token in input_ids:
        if token in special:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(token)
    return runs + ([run] if run else [])


def _ngrams(sequences, n: int = N) -> set[tuple[int, ...]]:
    return {tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)}


def _pair_ngrams(items, special) -> set:
    return _ngrams(seg for ids, _ in items for seg in _segments(list(ids), special))


def _batch_ngrams(batches, special) -> set:
    rows = [row[mask.bool()].tolist() for b in batches
            for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]  # fmt: skip
    return _ngrams(seg for row in rows for seg in _segments(row, special))


def _document_ngrams(tokenizer, documents: list[str]) -> set:
    return _ngrams(tokenizer(documents, add_special_tokens=False)["input_ids"])


def _trained_documents(tokenizer, documents: list[str], trained: set) -> list[int]:
    """Numbers of the documents that some trained pair comes from (shares an n-gram with)."""
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [i for i, doc in enumerate(ids) if _ngrams([doc]) & trained]


def _trained(module, world_size: int = 1) -> set:
    """N-grams of one whole training epoch of every rank."""
    seen = set()
    special = set(module.template.prefix + module.template.middle + module.template.suffix)
    for rank in range(world_size):
        module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        seen |= _pair_ngrams(module.train_dataset(), special)
    module.trainer = None
    return seen


@pytest.mark.parametrize("pretokenize", [True, False])
def test_held_out_documents_are_validated_on_and_never_trained_on(
    tokenizer, tokenizer_path, tmp_path, pretokenize
):
    documents = make_documents(60, seed=3)
    corpus = write_blank_line(tmp_path / "corpus.txt", documents)
    module = _module(tokenizer_path, tmp_path, paths=[corpus], val_batches=3, val_fraction=0.1,
                     pretokenize=pretokenize)  # fmt: skip
    module.setup()
    held_out = _document_ngrams(tokenizer, documents[::10])  # documents 0, 10, 20, ...
    special = set(module.template.prefix + module.template.middle + module.template.suffix)
    validated = _batch_ngrams(module.val_dataloader(), special)
    trained = _trained(module, world_size=2)
    assert validated and validated <= held_out
    assert not trained & held_out
    assert _trained_documents(tokenizer, documents, trained) == [i for i in range(60) if i % 10]


def test_the_sample_corpus_holds_out_a_tenth_never_trained_on(tokenizer, tokenizer_path, tmp_path):
    module = PretrainingDataModule(source="sample", tokenizer=tokenizer_path, batch_size=32,
                                   shuffle_buffer=0, num_workers=0, val_batches=4)  # fmt: skip
    module.setup()
    text = open(ensure_sample_corpus(None), encoding="utf-8").read()
    documents = [d for d in text.split("\n\n") if d.strip()]
    held_out = _document_ngrams(tokenizer, documents[::10])
    only_held_out = held_out - _document_ngrams(
        tokenizer, [d for i, d in enumerate(documents) if i % 10]
    )  # phrases that recur in the stdlib's docstrings are left out
    special = set(module.template.prefix + module.template.middle + module.template.suffix)
    validated = _batch_ngrams(module.val_dataloader(), special)
    assert len(module.val_dataloader()) == 4
    assert validated <= held_out and validated & only_held_out
    assert not _trained(module) & only_held_out


def test_val_paths_are_the_validation_text_and_the_corpus_is_trained_whole(
    tokenizer, tokenizer_path, tmp_path
):
    documents, extra = make_documents(20, seed=4), make_documents(6, seed=5)
    corpus = write_blank_line(tmp_path / "corpus.txt", documents)
    heldout = write_blank_line(tmp_path / "heldout.txt", extra)
    module = _module(tokenizer_path, tmp_path, paths=[corpus], val_paths=[heldout], val_batches=2)
    module.setup()
    special = set(module.template.prefix + module.template.middle + module.template.suffix)
    assert _batch_ngrams(module.val_dataloader(), special) <= _document_ngrams(tokenizer, extra)
    assert _trained_documents(tokenizer, documents, _trained(module)) == list(range(20))


def test_batches_are_the_same_every_time_and_for_every_seed(tokenizer_path, tmp_path):
    corpus = write_blank_line(tmp_path / "corpus.txt", make_documents(60, seed=3))
    first = _module(
        tokenizer_path, tmp_path, paths=[corpus], val_batches=3, seed=1, val_fraction=0.2
    )
    other = _module(
        tokenizer_path, tmp_path, paths=[corpus], val_batches=3, seed=2, val_fraction=0.2
    )
    first.setup()
    other.setup()
    runs = [
        list(first.val_dataloader()),
        list(first.val_dataloader()),
        list(other.val_dataloader()),
    ]
    assert [len(r) for r in runs] == [3, 3, 3]
    assert all(b["input_ids"].shape[0] == 4 for b in runs[0])  # full batches of batch_size
    for batches in runs[1:]:
        for a, b in zip(runs[0], batches, strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_validate_disjoint_equal_shares_of_all_batches(tokenizer_path, tmp_path, world_size):
    corpus = write_blank_line(tmp_path / "corpus.txt", make_documents(80, seed=3))
    module = _module(tokenizer_path, tmp_path, paths=[corpus], val_batches=4, val_fraction=0.5)
    module.setup()
    shares = []
    for rank in range(world_size):
        module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        shares.append([b["input_ids"] for b in module.val_dataloader()])
    expected = -(-4 // world_size) * world_size  # 4 rounded up to a multiple of the ranks
    assert len({len(s) for s in shares}) == 1 and sum(map(len, shares)) == expected
    flat = [ids for share in shares for ids in share]
    assert all(not torch.equal(a, b) for i, a in enumerate(flat) for b in flat[i + 1 :])


def test_fixed_batches_share_by_index():
    batches = [{"i": torch.tensor(i)} for i in range(6)]
    assert [int(b["i"]) for b in FixedBatches(batches, 1, 3)] == [1, 4]
    assert len(FixedBatches(batches)) == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_batches": 2, "val_fraction": 0.9}, "data.val_fraction=0.9 is not in (0, 0.5]"),
        ({"val_batches": 2, "val_fraction": 0.1, "val_paths": ["x.txt"]}, "give one"),
        ({"val_batches": 0, "val_paths": ["x.txt"]}, "switches validation off"),
        ({"val_batches": -1}, "data.val_batches=-1 is below 0"),
    ],
)
def test_bad_settings_are_refused(tokenizer_path, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _module(tokenizer_path, tmp_path, paths=["unused.txt"], **kwargs)


def test_too_little_held_out_text_is_refused_before_training(tokenizer_path, tmp_path):
    corpus = write_blank_line(tmp_path / "corpus.txt", make_documents(3, seed=3, sentences=(1, 1)))
    module = _module(tokenizer_path, tmp_path, paths=[corpus], val_batches=2, val_fraction=0.5)
    module.trainer = SimpleNamespace(global_rank=0, world_size=8)
    with pytest.raises(UserError, match="for 8 rank\\(s\\); raise data.val_fraction"):
        module.setup()
