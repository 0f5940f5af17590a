from lmdistill.data.sentences import paragraphs, split_sentences


def test_splits_on_end_punctuation_before_capitals_quotes_digits():
    text = 'It rained. Then it stopped! Did it? "Yes," she said. 3 birds sang. (Really.) Fine.'
    assert split_sentences(text) == [
        "It rained.", "Then it stopped!", "Did it?", '"Yes," she said.', "3 birds sang.",
        "(Really.)", "Fine.",
    ]  # fmt: skip


def test_keeps_abbreviations_and_initials():
    text = "Mr. Smith met Dr. Jones at 5 p.m. on Monday. The U.S. Army came. See e.g. the list. J. R. Tolkien wrote."
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Jones at 5 p.m. on Monday.",
        "The U.S. Army came.",
        "See e.g. the list.",
        "J. R. Tolkien wrote.",
    ]


def test_no_split_before_lowercase_or_decimals():
    assert split_sentences("Pi is 3.14 and e is 2.71. ok then.") == [
        "Pi is 3.14 and e is 2.71. ok then."
    ]


def test_hard_wrapped_lines_are_joined_and_paragraphs_are_boundaries():
    text = "A line that is\nhard wrapped ends here\n\nnext paragraph without stop\n  \nlast one."
    assert paragraphs(text) == [
        "A line that is hard wrapped ends here",
        "next paragraph without stop",
        "last one.",
    ]
    assert split_sentences(text) == paragraphs(text)


def test_no_text_is_dropped():
    text = "One. Two! Three?\nFour\n\nFive ... six. Seven"
    joined = "".join(split_sentences(text)).replace(" ", "")
    assert joined == "".join(text.split())
