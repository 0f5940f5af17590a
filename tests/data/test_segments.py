"""Pair builder invariants, checked against an independent reading of the document's tokens."""

import random

import pytest

from lmdistill.data.segments import PairTemplate, build_pairs


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def _document(rng: random.Random, sentences: int) -> list[list[int]]:
    # Unique token ids make positions in the document's token stream unambiguous.
    doc, next_id = [], 1000
    for _ in range(sentences):
        n = rng.randint(1, 40)
        doc.append(list(range(next_id, next_id + n)))
        next_id += n
    return doc


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("short_seq_prob", [0.0, 0.1, 1.0])
def test_pairs_fit_continue_and_cover(seed, short_seq_prob):
    rng = random.Random(seed)
    doc = _document(rng, rng.randint(1, 30))
    stream = [t for s in doc for t in s]
    max_tokens = 61
    pairs = build_pairs(doc, random.Random(seed + 100), max_tokens, short_seq_prob)
    cursor, covered = 0, 0
    for a, b in pairs:
        assert a and b and len(a) + len(b) <= max_tokens
        ia = _find(stream, a, cursor)
        ib = _find(stream, b, ia + len(a))
        assert ia >= cursor and ib >= ia + len(a), "B must follow A in the same document"
        # Between A and B only trimmed tokens (A's back, B's front) may be missing.
        cursor = ib + len(b)
        covered += len(a) + len(b)
    trimmed = len(stream) - covered
    assert trimmed >= 0
    if short_seq_prob == 0.0 and len(stream) >= 2:
        # Chunks overshoot the target by less than one sentence: little is trimmed.
        assert covered >= len(stream) - len(pairs) * 40


def test_full_length_pairs_without_short_sequences():
    doc = [list(range(i * 10, i * 10 + 10)) for i in range(100)]  # 1000 tokens, 10 per sentence
    pairs = build_pairs(doc, random.Random(0), 125, 0.0)
    assert all(len(a) + len(b) == 125 for a, b in pairs[:-1])
    assert sum(len(a) + len(b) for a, b in pairs) >= 1000 - 5 * len(pairs)


def test_short_documents():
    assert build_pairs([[7]], random.Random(0), 30, 0.0) == []
    assert build_pairs([], random.Random(0), 30, 0.0) == []
    assert build_pairs([[7, 8]], random.Random(0), 30, 0.0) == [([7], [8])]
    # A single long sentence is cut into pieces and split at a token position: nothing is lost.
    pairs = build_pairs([list(range(100))], random.Random(0), 30, 0.0)
    assert [t for a, b in pairs for t in a + b] == list(range(100))


def test_bert_template_matches_tokenizer(tokenizer):
    template = PairTemplate.from_tokenizer(tokenizer)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert template.input_ids([5, 6], [7]) == [cls, 5, 6, sep, 7, sep]
    assert template.token_type_ids(2, 1) == [0, 0, 0, 0, 1, 1]
    assert template.num_special == tokenizer.num_special_tokens_to_add(pair=True) == 3
    # Same as the tokenizer's own pair encoding.
    a = tokenizer("the river", add_special_tokens=False)["input_ids"]
    b = tokenizer("a city", add_special_tokens=False)["input_ids"]
    ref = tokenizer("the river", "a city")
    assert template.input_ids(a, b) == ref["input_ids"]
    assert template.token_type_ids(len(a), len(b)) == ref["token_type_ids"]


def test_roberta_template_from_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6, "d": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    template = PairTemplate.from_tokenizer(tok)
    assert template.input_ids([4], [5, 6]) == [0, 4, 2, 2, 5, 6, 2]
    assert template.token_type_ids(1, 2) == [0] * 7
