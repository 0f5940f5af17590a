"""Sources, formats, validation, determinism and sharding of the pretraining DataModule."""

import os
import re

import pytest
import torch
from corpora import make_documents, write_blank_line, write_jsonl, write_parquet

from lmdistill.data import PretrainingDataModule
from lmdistill.data.sources import iter_documents, local_spec
from lmdistill.errors import UserError


def _batches(dm, limit=None):
    dm.setup()
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if limit and len(out) >= limit:
            break
    return out


def _docs_seen(tokenizer, batches) -> list[int]:
    seen = []
    for b in batches:
        for row in b["input_ids"]:
            seen += [
                int(x) for x in re.findall(r"doc(\d+)x", tokenizer.decode(row).replace(" ", ""))
            ]
    return seen


def _marked_documents(n):
    # One pair per document (short), with the document number inside the text.
    return [f"Doc{i}x is here and now. It ends here." for i in range(n)]


def test_batches_layout(tokenizer_path, tokenizer, corpus):
    dm = PretrainingDataModule(
        "text", tokenizer_path, paths=[corpus], batch_size=4, max_seq_length=32, num_workers=0
    )
    batches = _batches(dm)
    assert len(batches) > 5
    for b in batches:
        ids, types, mask = b["input_ids"], b["token_type_ids"], b["attention_mask"]
        assert ids.dtype == types.dtype == mask.dtype == torch.long
        assert ids.shape == types.shape == mask.shape and ids.shape[1] <= 32
        assert mask.sum(1).max() == ids.shape[1]  # dynamic padding: longest row has no pad
        for row, t, m in zip(ids.tolist(), types.tolist(), mask.tolist(), strict=False):
            n = sum(m)
            row, t = row[:n], t[:n]
            assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
            assert row.count(tokenizer.sep_token_id) == 2
            s = row.index(tokenizer.sep_token_id)
            assert t == [0] * (s + 1) + [1] * (n - s - 1)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dir", "glob"])
def test_inputs_cover_every_document(tmp_path, tokenizer_path, tokenizer, fmt):
    docs = _marked_documents(12)
    if fmt == "jsonl":
        paths = [write_jsonl(tmp_path / "c.jsonl", docs)]
        document_format = "line"
    elif fmt == "parquet":
        paths = [write_parquet(tmp_path / "c.parquet", docs)]
        document_format = "line"
    else:
        (tmp_path / "sub").mkdir()
        write_blank_line(tmp_path / "sub" / "a.txt", docs[:5])
        write_blank_line(tmp_path / "b.txt", docs[5:])
        paths = [str(tmp_path)] if fmt == "dir" else [str(tmp_path / "**" / "*.txt")]
        document_format = "blank_line"
    dm = PretrainingDataModule(
        "text", tokenizer_path, paths=paths, document_format=document_format,
        batch_size=5, max_seq_length=64, short_seq_prob=0.0, num_workers=0,
    )  # fmt: skip
    assert sorted(_docs_seen(tokenizer, _batches(dm))) == list(range(12))


def test_line_and_wikitext_formats(tmp_path):
    lines = tmp_path / "l.txt"
    lines.write_text("first doc. two\nsecond doc\n\nthird doc\n")
    spec = local_spec([str(lines)], "line")
    assert [d for d, _ in iter_documents(spec, "line", "text")] == [
        "first doc. two",
        "second doc",
        "third doc",
    ]
    wiki = tmp_path / "w.txt"
    wiki.write_text(
        " \n = Alpha = \n \n Alpha is a 1 @,@ 000 @-@ year thing . \n \n = = History = = \n \n"
        " It was old . \n \n = Beta = \n \n Beta text here . \n"
    )
    spec = local_spec([str(wiki)], "wikitext")
    docs = [d for d, _ in iter_documents(spec, "wikitext", "text")]
    assert len(docs) == 2
    assert "Alpha is a 1,000-year thing ." in docs[0] and "It was old ." in docs[0]
    assert "History" not in docs[0] and "Beta text here ." in docs[1]


@pytest.mark.parametrize(
    "document_format,kind",
    [("blank_line", "txt"), ("line", "jsonl"), ("line", "parquet"), ("wikitext", "txt")],
)
def test_stream_positions_resume_exactly(tmp_path, document_format, kind):
    docs = make_documents(15, seed=3)
    if kind == "txt" and document_format == "wikitext":
        (tmp_path / "c.txt").write_text(
            "".join(f" = T{i} = \n \n {d} \n \n" for i, d in enumerate(docs))
        )
        path = str(tmp_path / "c.txt")
    elif kind == "txt":
        # Records holding several documents (blank lines made of spaces) exercise the skip count.
        path = str(tmp_path / "c.txt")
        (tmp_path / "c.txt").write_text(
            "\n\n".join(d if i % 3 else d + "\n  \n" + d for i, d in enumerate(docs))
        )
    elif kind == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", docs)
    else:
        path = write_parquet(tmp_path / "c.parquet", docs)
    spec = local_spec([path], document_format)
    full = list(iter_documents(spec, document_format, "text"))
    for i, (_, position) in enumerate(full):
        rest = [d for d, _ in iter_documents(spec, document_format, "text", position)]
        assert rest == [d for d, _ in full[i + 1 :]]


def test_deterministic_given_seed_and_different_across_seeds(tokenizer_path, corpus):
    def run(seed, workers):
        dm = PretrainingDataModule(
            "text",
            tokenizer_path,
            paths=[corpus],
            batch_size=4,
            max_seq_length=32,
            num_workers=workers,
            seed=seed,
            shuffle_buffer=16,
        )
        return [b["input_ids"] for b in _batches(dm)]

    a, b, c = run(1, 0), run(1, 0), run(2, 0)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not (len(a) == len(c) and all(torch.equal(x, y) for x, y in zip(a, c, strict=False)))
    d, e = run(1, 2), run(1, 2)
    assert len(d) == len(e) and all(torch.equal(x, y) for x, y in zip(d, e, strict=False))


def test_workers_and_ranks_disjoint_and_complete(tmp_path, tokenizer_path, tokenizer):
    path = write_blank_line(tmp_path / "c.txt", _marked_documents(23))
    dm = PretrainingDataModule(
        "text",
        tokenizer_path,
        paths=[path],
        batch_size=3,
        max_seq_length=64,
        short_seq_prob=0.0,
        num_workers=2,
    )
    dm.setup()
    per_stream = []
    for rank in range(2):
        ds = dm.train_dataset()
        ds.rank, ds.world_size = rank, 2
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        ids = _docs_seen(tokenizer, [{"input_ids": torch.as_tensor(x)[None]} for x, _ in loader])
        per_stream.append(ids)
        # Document n goes to global worker n % 4 (rank * 2 + worker).
        assert {n % 4 for n in ids} == {rank * 2, rank * 2 + 1}
    seen = per_stream[0] + per_stream[1]
    assert sorted(seen) == list(range(23))


def test_epochs_advance_and_differ(tokenizer_path, corpus):
    dm = PretrainingDataModule(
        "text", tokenizer_path, paths=[corpus], batch_size=4, max_seq_length=32, num_workers=0
    )
    dm.setup()
    loader = dm.train_dataloader()
    first = [b["input_ids"] for b in loader]
    second = [b["input_ids"] for b in loader]
    assert loader.state_dict()["lmdistill_epoch"] == 1
    assert not (
        len(first) == len(second)
        and all(torch.equal(x, y) for x, y in zip(first, second, strict=False))
    )


def test_sample_source_is_real_text(tmp_path, tokenizer_path, tokenizer):
    dm = PretrainingDataModule(
        "sample", tokenizer_path, batch_size=8, num_workers=0, cache_dir=str(tmp_path)
    )
    batches = _batches(dm, limit=3)
    text = " ".join(
        tokenizer.decode(row, skip_special_tokens=True) for row in batches[0]["input_ids"]
    )
    assert len(text.split()) > 200 and " the " in text
    corpus = (tmp_path / "stdlib_docs.txt").read_text()
    assert len(corpus.split()) > 100_000 and "\n\n" in corpus
    assert ">>>" not in corpus


def _dm(**kw):
    args = dict(source="text", tokenizer="", paths=None)
    args.update(kw)
    return PretrainingDataModule(**args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(source="nope"), "unknown data source"),
        (dict(document_format="xml", paths=["x"]), "unknown document_format"),
        (dict(paths=None), "needs data paths"),
        (dict(source="hub"), "needs a dataset name"),
        (dict(paths=["x"], batch_size=0), "batch_size"),
        (dict(paths=["x"], max_seq_length=4), "max_seq_length 4"),
    ],
)
def test_constructor_errors(tokenizer_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        _dm(tokenizer=tokenizer_path, **kwargs)


def test_setup_errors(tmp_path, tokenizer_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "missing*.txt"))):
        _dm(tokenizer=tokenizer_path, paths=[str(tmp_path / "missing*.txt")]).setup()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(UserError, match="corpus is empty"):
        _dm(tokenizer=tokenizer_path, paths=[str(empty)]).setup()
    with pytest.raises(UserError, match="exceeds the tokenizer's model maximum"):
        _dm(tokenizer=tokenizer_path, paths=[str(empty)], max_seq_length=4096).setup()
    with pytest.raises(UserError, match="tokenizer path .* does not exist"):
        _dm(tokenizer=str(tmp_path / "no_tokenizer"), paths=[str(empty)]).setup()
    jsonl = write_jsonl(tmp_path / "c.jsonl", ["some text here"], field="body")
    with pytest.raises(UserError, match="no field 'text'"):
        _dm(tokenizer=tokenizer_path, paths=[jsonl], document_format="line").setup()


def test_a_file_that_is_not_utf8_is_named(tmp_path, tokenizer_path):
    """Found before anything is cached, whichever file of the corpus it is."""
    good = write_blank_line(tmp_path / "a.txt", make_documents(3))
    (tmp_path / "b.txt").write_bytes("Caf\u00e9 au lait. Tr\u00e8s bien.\n".encode("latin-1"))
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        _dm(tokenizer=tokenizer_path, paths=[good, str(tmp_path / "b.txt")],
            cache_dir=str(cache)).setup()  # fmt: skip
    message = str(info.value)
    assert f"{tmp_path / 'b.txt'} is not UTF-8 text (byte 0xe9 at offset 3)" in message
    assert "\n" not in message
    assert os.listdir(cache / "tokens") == ["file-facts"]  # what was read, remembered; no cache


@pytest.mark.parametrize(
    "kwargs,world,shown",
    [
        (dict(val_batches=1), 1, "(1 document in 100 held out) gives 0 segment pair(s) on rank 0"),
        (dict(), 1, "gives 1 segment pair(s) on rank 0 of 1"),
        (dict(batch_size=1), 2, "gives 0 segment pair(s) on rank 1 of 2"),
    ],
)
def test_training_text_shorter_than_a_batch_is_refused(
    tmp_path, tokenizer_path, kwargs, world, shown
):
    """Else every epoch ends without a step and training spins through epochs forever."""
    path = write_blank_line(tmp_path / "c.txt", ["One short sentence here. Another follows it."])
    args = dict(tokenizer=tokenizer_path, paths=[path], batch_size=4, max_seq_length=32,
                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    args.update(kwargs)
    dm = _dm(**args)
    dm._rank_world = lambda: (0, world)
    with pytest.raises(UserError, match=re.escape(shown) + ".*fewer than one batch"):
        dm.setup()
    if world > 1:  # set up before the trainer knew its ranks (as the CLI does), then trained
        dm = _dm(**args)
        dm.setup()
        dm._rank_world = lambda: (0, world)
        with pytest.raises(UserError, match=re.escape(shown) + ".*fewer than one batch"):
            dm.train_dataloader()


def test_a_record_that_fails_mid_build_is_one_error(tmp_path, tokenizer_path, monkeypatch):
    """A loader error past the first record (which setup reads first) names the corpus, and the
    half-built cache is gone."""
    from lmdistill.data import token_cache

    def failing(*args):
        yield next(iter_documents(*args))
        raise ValueError("JSON parse error in row 7")

    monkeypatch.setattr(token_cache, "iter_documents", failing)
    path = write_blank_line(tmp_path / "c.txt", make_documents(3))
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        _dm(tokenizer=tokenizer_path, paths=[path], cache_dir=str(cache)).setup()
    message = str(info.value)
    assert f"cannot read corpus {path} (ValueError: JSON parse error in row 7)" in message
    left = [n for n in os.listdir(cache / "tokens") if not n.endswith(".lock")]
    assert left == ["file-facts"]  # the files' hashes, remembered; no half-built cache


def test_a_hub_corpus_without_the_hub_says_so(tokenizer_path):
    """The tests run offline (HF_DATASETS_OFFLINE=1): the fix names the hub, not the files."""
    with pytest.raises(UserError) as info:
        _dm(tokenizer=tokenizer_path, source="hub", hf_path="wikimedia/wikipedia",
            hf_name="20231101.en", paths=None).setup()  # fmt: skip
    message = str(info.value)
    assert "cannot read corpus wikimedia/wikipedia" in message and "\n" not in message
    assert "HF_DATASETS_OFFLINE" in message and "data=text" in message


def test_a_hub_corpus_found_offline_with_a_wrong_split_names_the_setting(tmp_path, tokenizer_path):
    """Offline, a dataset that is found (a local directory here, or the hub cache) with a split
    it lacks is a settings error, not a reason to go online."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", make_documents(3))
    with pytest.raises(UserError) as info:
        _dm(tokenizer=tokenizer_path, source="hub", hf_path=str(tmp_path / "ds"),
            hf_split="validation", paths=None).setup()  # fmt: skip
    message = str(info.value)
    assert "Bad split: validation" in message and "data.hf_split" in message
    assert "HF_DATASETS_OFFLINE" not in message and "\n" not in message


def test_a_tokenizer_under_home_tokenizes_on_the_fly(tmp_path, tokenizer_path, corpus, monkeypatch):
    """`~/...` is read the same by setup and by the streams that tokenize without the cache."""
    monkeypatch.setenv("HOME", str(tmp_path))
    os.symlink(tokenizer_path, tmp_path / "tok")

    def first_batch(tokenizer):
        dm = _dm(tokenizer=tokenizer, paths=[corpus], batch_size=4, pretokenize=False)
        dm.setup()
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch("~/tok"), first_batch(tokenizer_path))


def test_an_unreadable_jsonl_is_one_line_on_stderr(tmp_path, tokenizer_path, capfd):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "A first record. It has two sentences."}\n{"text": "cut off\n')
    with pytest.raises(UserError, match=r"cannot read corpus .*bad\.jsonl \(ArrowInvalid: JSON"):
        _dm(tokenizer=tokenizer_path, paths=[str(path)], document_format="line",
            cache_dir=str(tmp_path / "cache")).setup()  # fmt: skip
    assert "bad.jsonl" not in capfd.readouterr().err  # nothing but the error itself


def test_bad_validation_files_name_data_val_paths(tmp_path, tokenizer_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for val_paths, shown in (
        ([str(tmp_path / "held*.txt")], "matches no file; give existing files, globs or"),
        ([str(empty)], "corpus is empty: no text in"),
    ):
        dm = _dm(tokenizer=tokenizer_path, paths=[corpus], val_paths=val_paths, val_batches=1)
        with pytest.raises(UserError, match=shown + r".*\(data\.val_paths"):
            dm.setup()
