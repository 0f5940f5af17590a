"""The token cache: contents, keys, concurrent builds, and streams that read or fill it."""

import io
import os
import threading

import pytest
import torch
from corpora import make_documents, write_blank_line, write_jsonl

from lmdistill.data import PretrainingDataModule, token_cache
from lmdistill.data.segments import plain_backend
from lmdistill.data.sentences import split_sentences
from lmdistill.data.sources import StreamSpec, iter_documents, local_spec


def _dm(tmp_path, tokenizer_path, workers=0, pretokenize=True, **kw):
    args = dict(
        source="text", tokenizer=tokenizer_path, batch_size=4, max_seq_length=32,
        shuffle_buffer=8, num_workers=workers, seed=7, cache_dir=str(tmp_path / "cache"),
        pretokenize=pretokenize,
    )  # fmt: skip
    args.update(kw)
    dm = PretrainingDataModule(**args)
    dm.setup()
    return dm


def _ids(loader) -> list[torch.Tensor]:
    return [b["input_ids"] for b in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(token_cache, "SHARD_DOCUMENTS", 5)


@pytest.fixture
def hub_dir(tmp_path):
    """A local dataset directory read through the hub code path (no network)."""
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", make_documents(23, seed=11))
    return str(tmp_path / "hub")


def _no_stream(monkeypatch):
    def refuse(self):
        raise AssertionError("the text stream was read although the cache holds it")

    monkeypatch.setattr(StreamSpec, "load", refuse)


def test_cache_holds_each_documents_sentence_tokens(tmp_path, tokenizer_path, tokenizer):
    docs = make_documents(12, seed=2)
    path = write_blank_line(tmp_path / "c.txt", docs)
    spec = local_spec([path], "blank_line")
    cache = token_cache.TokenCache(str(tmp_path / "k"), 5, len(tokenizer))
    token_cache.build_cache(cache, spec, "blank_line", "text", plain_backend(tokenizer))
    got = []
    for shard in range(3):
        reader = cache.open_shard(shard)
        got += [doc for _, doc in reader.documents(0, 0, 1)]
    expected = [
        [tokenizer(s, add_special_tokens=False)["input_ids"] for s in split_sentences(d)]
        for d in docs
    ]
    assert got == expected
    assert cache.complete and reader.end.final and reader.end.end_doc == 12
    # Worker 1 of 3 sees documents 1, 4, 7, 10 from a start of 2 on.
    numbers = [n for s in range(3) for n, _ in cache.open_shard(s).documents(2, 1, 3)]
    assert numbers == [4, 7, 10]
    assert not [f for f in os.listdir(tmp_path / "k") if f.startswith(".tmp")]


def test_key_follows_tokenizer_file_and_format(tmp_path, tokenizer):
    path = write_blank_line(tmp_path / "c.txt", ["One. Two."])
    spec = local_spec([path], "blank_line")
    tok_json = plain_backend(tokenizer).to_str()

    def key(**kw):
        args = dict(document_format="blank_line", text_field="text", tokenizer_json=tok_json)
        args.update(kw)
        return token_cache.cache_key(spec, shard_documents=5, **args)

    first = key()
    assert key() == first
    assert key(tokenizer_json=tok_json.replace("[UNK]", "[UNK2]")) != first
    assert key(document_format="line") != first
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert key() == first  # touched, not changed: the cache is reused


def _cached_documents(cache) -> list:
    docs, shard = [], 0
    while (reader := cache.open_shard(shard)) is not None:
        docs += [doc for _, doc in reader.documents(0, 0, 1)]
        shard += 1
    return docs


def test_cache_follows_contents_of_same_size_and_time(tmp_path, tokenizer_path, tokenizer):
    """An edit that keeps the file's name, size and modification time still rebuilds."""
    old, new = ["Alpha beta gamma. Delta epsilon."] * 6, ["Omega sigma gamm. Delta epsilon."] * 6
    path = tmp_path / "c.txt"
    write_blank_line(path, old)
    stat = os.stat(path)
    first = _dm(tmp_path, tokenizer_path, paths=[str(path)])
    write_blank_line(path, new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    second = _dm(tmp_path, tokenizer_path, paths=[str(path)])
    for dm, docs in ((first, old), (second, new)):
        expected = [
            [tokenizer(s, add_special_tokens=False)["input_ids"] for s in split_sentences(d)]
            for d in docs
        ]
        assert _cached_documents(dm.cache) == expected
    # The same text elsewhere, named relatively from another directory, reuses the cache.
    (tmp_path / "elsewhere").mkdir()
    write_blank_line(tmp_path / "elsewhere" / "copy.txt", new)
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:
        m.chdir(tmp_path / "elsewhere")
        third = _dm(tmp_path, tokenizer_path, paths=["copy.txt"])
    assert third.cache.root == second.cache.root


def test_local_dataset_directory_is_keyed_by_contents(tmp_path, tokenizer, hub_dir):
    spec = StreamSpec(hub_dir, None, None, "train", None)
    tok_json = plain_backend(tokenizer).to_str()
    first = token_cache.cache_key(spec, "line", "text", tok_json, 5)
    path = os.path.join(hub_dir, "train.jsonl")
    stat = os.stat(path)
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("river", "RIVER"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert token_cache.cache_key(spec, "line", "text", tok_json, 5) != first


def test_failed_build_leaves_no_cache(tmp_path, tokenizer, monkeypatch):
    path = write_blank_line(tmp_path / "c.txt", make_documents(12, seed=2))
    spec = local_spec([path], "blank_line")
    cache = token_cache.TokenCache(str(tmp_path / "k"), 5, len(tokenizer))

    def failing(*args):
        for i, item in enumerate(iter_documents(*args)):
            if i == 8:  # after the first shard was written
                raise ValueError("bad record")
            yield item

    monkeypatch.setattr(token_cache, "iter_documents", failing)
    with pytest.raises(ValueError, match="bad record"):
        token_cache.build_cache(cache, spec, "blank_line", "text", plain_backend(tokenizer))
    assert not os.path.exists(cache.root)


def test_concurrent_builds_give_one_cache(tmp_path, tokenizer):
    path = write_blank_line(tmp_path / "c.txt", make_documents(30, seed=4))
    spec = local_spec([path], "blank_line")
    cache = token_cache.TokenCache(str(tmp_path / "k"), 7, len(tokenizer))
    errors = []

    def build():
        try:
            token_cache.build_cache(cache, spec, "blank_line", "text", plain_backend(tokenizer))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cache.complete
    assert [n for s in range(5) for n, _ in cache.open_shard(s).documents(0, 0, 1)] == list(
        range(30)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_pairs_equal_on_the_fly_pairs(tmp_path, tokenizer_path, small_shards, workers):
    path = write_blank_line(tmp_path / "c.txt", make_documents(23, seed=9))
    live = _ids(
        _dm(tmp_path, tokenizer_path, workers, pretokenize=False, paths=[path]).train_dataloader()
    )
    cached = _dm(tmp_path, tokenizer_path, workers, paths=[path])
    assert cached.cache.complete
    assert _same(_ids(cached.train_dataloader()), live)


def test_streamed_source_fills_the_cache_then_reads_it(
    tmp_path, tokenizer_path, hub_dir, small_shards, monkeypatch
):
    kw = dict(source="hub", hf_path=hub_dir, document_format="line")
    reference = _ids(_dm(tmp_path, tokenizer_path, 2, pretokenize=False, **kw).train_dataloader())
    first = _dm(tmp_path, tokenizer_path, 2, **kw)
    assert not first.cache.complete  # hub corpora are not built ahead
    assert _same(_ids(first.train_dataloader()), reference)
    assert all(first.cache.open_shard(s) is not None for s in range(5))  # 23 docs, 5 per shard
    # A later run reads the cache only, with the same or another worker count.
    _no_stream(monkeypatch)
    second = PretrainingDataModule(
        tokenizer=tokenizer_path, batch_size=4, max_seq_length=32, shuffle_buffer=8,
        seed=7, cache_dir=str(tmp_path / "cache"), num_workers=2, **kw,
    )  # fmt: skip
    second.spec, second.cache = first.spec, first.cache  # setup() would peek at the stream
    second.template, second.pad_token_id = first.template, first.pad_token_id
    assert _same(_ids(second.train_dataloader()), reference)
    second.num_workers = 0
    single = _ids(second.train_dataloader())
    monkeypatch.undo()
    monkeypatch.setattr(token_cache, "SHARD_DOCUMENTS", 5)
    expected = _dm(tmp_path, tokenizer_path, 0, pretokenize=False, **kw).train_dataloader()
    assert _same(single, _ids(expected))


@pytest.mark.parametrize("k", [2, 9])
def test_resume_while_filling_the_cache(tmp_path, tokenizer_path, hub_dir, small_shards, k):
    kw = dict(source="hub", hf_path=hub_dir, document_format="line")
    reference = _ids(_dm(tmp_path, tokenizer_path, 2, pretokenize=False, **kw).train_dataloader())
    loader = _dm(tmp_path, tokenizer_path, 2, **kw).train_dataloader()
    it = iter(loader)
    for _ in range(k + 1):
        next(it)
    for _ in range(k):
        loader.mark_batch_consumed()
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    del it
    buffer.seek(0)
    fresh = _dm(tmp_path, tokenizer_path, 2, **kw).train_dataloader()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _same(_ids(fresh), reference[k:])
    # Shards seen only in part were not written; a full pass reads the rest from the stream.
    assert _same(_ids(_dm(tmp_path, tokenizer_path, 2, **kw).train_dataloader()), reference)


def test_hub_records_are_whole_documents(tmp_path, tokenizer_path, tokenizer):
    """A hub article's paragraphs are one document: pairs span them (docs/methods.md section 9)."""
    (tmp_path / "wiki").mkdir()
    articles = [
        f"Doc{i}x opens the first paragraph.\n\nDoc{i}y opens the second." for i in range(6)
    ]
    write_jsonl(tmp_path / "wiki" / "train.jsonl", articles)
    dm = _dm(
        tmp_path, tokenizer_path, source="hub", hf_path=str(tmp_path / "wiki"),
        document_format="blank_line", short_seq_prob=0.0, max_seq_length=64,
    )  # fmt: skip
    docs = [d for d, _ in iter_documents(dm.spec, "blank_line", "text")]
    assert docs == articles
    rows = [
        tokenizer.decode(r, skip_special_tokens=True)
        for b in dm.train_dataloader()
        for r in b["input_ids"]
    ]
    assert len(rows) == 6
    for row in rows:
        text = row.replace(" ", "")
        i = text[3 : text.index("x")]
        assert f"doc{i}y" in text  # A is the first paragraph, B the second
