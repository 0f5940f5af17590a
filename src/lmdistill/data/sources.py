"""Corpus sources as one kind of stream: a Hugging Face `datasets.IterableDataset`.

Local files (`.txt`, `.jsonl`/`.json`, `.parquet`) and hub datasets go through the same streaming
code path (`load_dataset(..., streaming=True)`), so memory stays flat however large the corpus.
`iter_documents` turns the stream of records into documents and, with each document, the
position at which the stream resumes to produce the *next* document: `(hf_state, skip)`, the
dataset's own `state_dict()` (taken between records) plus how many documents of that record to
skip. A checkpoint therefore never re-reads the corpus from its start.

Document formats:
* `blank_line`: documents separated by blank lines in text files (read with
  `sample_by="paragraph"`; records are re-split at blank lines made of spaces or `\\r`, which the
  `datasets` paragraph reader does not treat as breaks). Records of jsonl/parquet/hub datasets
  are one document each (docs/methods.md section 9): a Wikipedia article's blank lines end
  paragraphs, hence sentences, never the document, so pairs may span paragraphs.
* `line`: one document per line (text files) or per record (jsonl/parquet/hub).
* `wikitext`: WikiText lines; a new document at each top-level ` = Title = ` heading. Heading
  lines are markup and are not part of the text; `@-@`, `@,@`, `@.@` are undone.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from lmdistill.data.file_facts import file_facts
from lmdistill.errors import UserError

SOURCES = ("text", "hub", "sample")
DOCUMENT_FORMATS = ("blank_line", "line", "wikitext")
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_BLANK_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n")
_WIKI_TITLE = re.compile(r"^ ?= [^=].* = ?$")
_WIKI_HEADING = re.compile(r"^ ?(= )+.*( =)+ ?$")
_WIKI_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))

# Position in a stream: (state_dict of the Hugging Face dataset or None for its start, documents
# of the record at that state to skip).
Position = tuple


@dataclass(frozen=True)
class StreamSpec:
    """Picklable recipe of a `datasets.IterableDataset` (built lazily in each worker)."""

    builder: str  # "text", "json", "parquet", or a hub dataset path
    data_files: tuple[str, ...] | None
    name: str | None
    split: str
    sample_by: str | None  # only for builder "text"

    @property
    def paragraph_records(self) -> bool:
        """True when a record is a blank-line separated chunk of a text file, not a document."""
        return self.builder == "text" and self.sample_by == "paragraph"

    def load(self):
        import datasets

        kwargs = {"split": self.split, "streaming": True}
        if self.data_files is not None:
            kwargs["data_files"] = list(self.data_files)
        if self.sample_by is not None:
            kwargs["sample_by"] = self.sample_by
        if self.name is not None:
            return datasets.load_dataset(self.builder, self.name, **kwargs)
        return datasets.load_dataset(self.builder, **kwargs)


def resolve_paths(paths: list[str] | str, setting: str = "data.paths") -> list[str]:
    """Expand files, globs and directories (searched recursively) into a sorted file list;
    `setting` names the option they came from in errors."""
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for pattern in paths:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            found = [
                os.path.join(root, f)
                for root, _, names in os.walk(pattern)
                for f in names
                if os.path.splitext(f)[1].lower() in _BUILDERS
            ]
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not found:
            raise UserError(
                f"data path {pattern!r} matches no file; give existing files, globs or "
                f"directories containing .txt, .jsonl, .json or .parquet files ({setting}=...)"
            )
        files.extend(sorted(os.path.abspath(f) for f in found))
    return list(dict.fromkeys(files))  # keep order, drop duplicates


def check_utf8(path: str, memo_dir: str | None = None) -> None:
    """A UserError naming the file and the first offending byte unless `path` is UTF-8 text
    (`memo_dir`: where `file_facts` remembers what it read)."""
    problem = file_facts(path, memo_dir).utf8_problem
    if problem is not None:
        raise UserError(
            f"data file {path} is not UTF-8 text ({problem}); convert it to UTF-8 (e.g. iconv "
            "-f latin1 -t utf-8) or leave it out of the data paths"
        )


def local_spec(files: list[str], document_format: str, memo_dir: str | None = None) -> StreamSpec:
    """The stream of local files; unknown extensions are read as text, which must be UTF-8
    (`check_utf8`, with `memo_dir`)."""
    builders = {_BUILDERS.get(os.path.splitext(f)[1].lower(), "text") for f in files}
    if len(builders) > 1:
        raise UserError(
            f"data paths mix file kinds ({', '.join(sorted(builders))}); give files of one kind "
            "(all .txt, all .jsonl/.json or all .parquet)"
        )
    builder = builders.pop()
    if builder in ("text", "json"):
        for f in files:
            check_utf8(f, memo_dir)
    sample_by = None
    if builder == "text":
        sample_by = "paragraph" if document_format == "blank_line" else "line"
    return StreamSpec(builder, tuple(files), None, "train", sample_by)


def hub_spec(hf_path: str, hf_name: str | None, hf_split: str) -> StreamSpec:
    return StreamSpec(hf_path, None, hf_name, hf_split, None)


def _clean_wikitext(lines: list[str]) -> str:
    kept = []
    for line in lines:
        if _WIKI_HEADING.match(line):
            kept.append("")  # a heading ends a paragraph
            continue
        for old, new in _WIKI_ESCAPES:
            line = line.replace(old, new)
        kept.append(line.strip())
    return "\n".join(kept)


def _record_text(record: dict, text_field: str) -> str:
    if text_field not in record:
        raise UserError(
            f"records have no field {text_field!r} (fields: {', '.join(record)}); "
            "set data.text_field to the column holding the text"
        )
    value = record[text_field][0]
    return value if isinstance(value, str) else ("" if value is None else str(value))


def iter_documents(
    spec: StreamSpec, document_format: str, text_field: str, start: Position = (None, 0)
) -> Iterator[tuple[str, Position]]:
    """Yield `(document_text, position_of_next_document)` from the stream of `spec`.

    Empty documents are skipped (they are not counted). Resuming from a yielded position gives
    exactly the documents that followed it.
    """
    dataset = spec.load()
    split_records = document_format == "blank_line" and spec.paragraph_records
    hf_state, skip = start
    if hf_state is not None:
        dataset.load_state_dict(hf_state)
    before = hf_state
    wiki_lines: list[str] = []
    for record in dataset.iter(batch_size=1):
        text = _record_text(record, text_field)
        after = dataset.state_dict()
        if document_format == "wikitext":
            if _WIKI_TITLE.match(text) and wiki_lines:
                doc = _clean_wikitext(wiki_lines)
                wiki_lines = []
                if doc.strip():
                    yield doc, (before, 0)  # the next document starts at this heading
            wiki_lines.append(text)
        else:
            if split_records:
                docs = [d for d in _BLANK_SPLIT.split(text) if d.strip()]
            else:
                docs = [text] if text.strip() else []
            for i, doc in enumerate(docs):
                if i < skip:
                    continue
                yield doc, ((after, 0) if i == len(docs) - 1 else (before, i + 1))
            skip = 0
        before = after
    if wiki_lines:
        doc = _clean_wikitext(wiki_lines)
        if doc.strip():
            yield doc, (before, 0)
