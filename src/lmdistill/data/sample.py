"""The offline default corpus: the documentation of the Python standard library.

Real English prose present on every machine that runs Python, extracted at run time (this
repository ships no text written elsewhere): the module, class and function docstrings of the
stdlib `.py` files (tests, idlelib, lib2to3, site-packages and the like skipped), dedented, with
doctest (`>>>`, `...`) and code-like lines dropped, docstrings shorter than 20 words skipped, one
document per module (its docstrings in source order, paragraphs kept), modules in path order;
then the language-reference topics of `pydoc_data/topics.py`, one document per topic.
Written once to `<cache_dir>/stdlib_docs.txt` (blank-line separated documents; a document's
paragraphs are joined by single newlines, so the `blank_line` format sees one document per
module), atomically, with a version stamp in a side file.

Size on CPython 3.11 (the development machine): 383 documents, 182 k words, 1.1 MB of text,
about 245 k BERT word pieces = 67 batches of 32 x 128 per epoch. The stdlib holds no more prose
than that; runs longer than an epoch cycle through epochs (each epoch pairs and shuffles the text
differently, seeded by the epoch). Use `source=text` with a real corpus for anything beyond demos.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sysconfig
import tempfile
import warnings

VERSION = "1"
FILE_NAME = "stdlib_docs.txt"
MIN_WORDS = 20
_SKIP_DIRS = {
    "test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter",
    "turtledemo", "ensurepip", "__pycache__", "pydoc_data", "venv", "distutils",
}  # fmt: skip
_CODE_LINE = re.compile(
    r"^\s*(>>>|\.\.\.|\$ |#|def |class |import |from \S+ import|return\b|if .*:$|for .*:$)"
    r"|[{};]\s*$|^\s*[\w.\[\]]+\s*=[^=]|^\s*[\w.]+\(.*\)\s*$|^\W+$"
)


def default_cache_dir() -> str:
    return os.environ.get("LMDISTILL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lmdistill", "sample"
    )


def _docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of the module, classes and functions, in source order."""
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n, clean=True))]


def _clean(doc: str) -> str:
    """Drop doctest and code-like lines; keep paragraphs (one per line)."""
    paragraphs, current = [], []
    for line in inspect.cleandoc(doc).splitlines():
        if not line.strip() or line.startswith((" ", "\t")) or _CODE_LINE.search(line):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(p for p in paragraphs if len(p.split()) >= 3)


def module_documents(stdlib: str | None = None) -> list[str]:
    """One document per stdlib module, ordered by path."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(os.path.join(root, n) for n in names if n.endswith(".py"))
    documents = []
    for path in sorted(files):
        try:
            with open(path, encoding="utf-8") as f:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        parts = []
        for doc in _docstrings(tree):
            if len(doc.split()) < MIN_WORDS:
                continue
            cleaned = _clean(doc)
            if len(cleaned.split()) >= MIN_WORDS // 2:
                parts.append(cleaned)
        if parts:
            documents.append("\n".join(parts))
    return documents + _topic_documents(stdlib)


def _topic_documents(stdlib: str) -> list[str]:
    """The language-reference topics of `pydoc_data/topics.py` (what `help("topic")` shows)."""
    path = os.path.join(stdlib, "pydoc_data", "topics.py")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign))
    except (OSError, SyntaxError, ValueError, StopIteration):
        return []
    documents = []
    for _, text in sorted(topics.items()):
        cleaned = _clean(text)
        if len(cleaned.split()) >= MIN_WORDS:
            documents.append(cleaned)
    return documents


def ensure_sample_corpus(cache_dir: str | None = None) -> str:
    """Path of the extracted corpus, extracting it first if absent or stale."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, FILE_NAME)
    stamp = path + ".version"
    try:
        with open(stamp, encoding="utf-8") as f:
            if f.read().strip() == VERSION and os.path.getsize(path) > 0:
                return path
    except OSError:
        pass
    text = "\n\n".join(module_documents()) + "\n"
    for target, content in ((path, text), (stamp, VERSION)):
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, target)
    return path
