"""Documents to sentences: a rule-based splitter good enough for English prose.

A document is first cut into paragraphs at blank lines; the lines inside a paragraph are joined
with spaces (undoing hard wrapping); a paragraph is then cut after `.`, `!` or `?` (plus closing
quotes or brackets) when the next word starts with a capital letter, a digit or an opening quote.
Known abbreviations ("Mr.", "e.g.", "U.S.", single initials) do not end a sentence. Sentences
never cross paragraph boundaries. A very long "sentence" is fine: the pair builder cuts it.
"""

from __future__ import annotations

import re

# Lower-cased abbreviations (without the final dot) after which a period does not end a sentence.
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al fig figs eq no nos vol vols pp ed eds
    gen col lt capt sgt rev hon gov sen rep jan feb mar apr jun jul aug sep sept oct nov dec
    inc ltd co corp dept est approx u.s u.k u.n a.m p.m ph.d b.c a.d d.c""".split()
)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
# A candidate boundary: end punctuation, optional closing quotes/brackets, whitespace, then a
# capital letter, a digit or an opening quote/bracket.
_BOUNDARY = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)(\s+)(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)$")


def paragraphs(text: str) -> list[str]:
    """Split at blank lines; join the hard-wrapped lines of each paragraph; drop empty ones."""
    out = []
    for block in _PARAGRAPH_BREAK.split(text):
        joined = " ".join(line.strip() for line in block.splitlines() if line.strip())
        if joined:
            out.append(joined)
    return out


def _is_abbreviation(prefix: str) -> bool:
    """True when the text before a period ends with an abbreviation or a single initial."""
    match = _LAST_WORD.search(prefix)
    if match is None:
        return False
    word = match.group(1).lstrip("(\"'\u201c\u2018[").rstrip(".").lower()
    if len(word) == 1 and word.isalpha():  # an initial: "J. Smith"
        return True
    return word in ABBREVIATIONS


def split_paragraph(paragraph: str) -> list[str]:
    """Sentences of one paragraph (no newlines inside)."""
    sentences = []
    start = 0
    for match in _BOUNDARY.finditer(paragraph):
        punct_end = match.end(1)
        if match.group(1).startswith(".") and len(match.group(1).rstrip("\"'\u201d\u2019)]")) == 1:
            if _is_abbreviation(paragraph[start : match.start(1)]):
                continue
        sentence = paragraph[start:punct_end].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end(2)
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_sentences(text: str) -> list[str]:
    """Sentences of a document, in order; every non-space character of `text` is kept."""
    return [s for p in paragraphs(text) for s in split_paragraph(p)]
