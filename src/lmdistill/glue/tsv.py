"""Readers for the original GLUE TSV files (as distributed before the Hugging Face hub).

The files differ: MRPC starts with a UTF-8 BOM, CoLA has no header, STS-B keeps its score in the
last of 10 columns, RTE and QNLI label with strings, quotes are literal text (never CSV quoting).
Every row is checked; a bad one raises a `UserError` naming the file, the line and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmdistill.errors import UserError
from lmdistill.glue.tasks import TaskSpec


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one sentence, or a pair
    label: int | float  # class index, or the STS-B similarity score


def task_file(glue_dir: str | Path, task: TaskSpec, stem: str) -> Path:
    """`<glue_dir>/<Task>/<stem>.tsv`, or a UserError saying what is missing."""
    root = Path(glue_dir).expanduser()
    if not root.is_dir():
        raise UserError(
            f"GLUE directory {root} does not exist; set data.glue_dir to the folder that holds "
            f"{task.glue_dir}/ (or data.glue_dir=null to download nyu-mll/glue)"
        )
    path = root / task.glue_dir / f"{stem}.tsv"
    if not path.is_file():
        raise UserError(
            f"{path} is missing; put the GLUE {task.glue_dir} files ({stem}.tsv) under "
            f"{root / task.glue_dir}"
        )
    return path


def read_tsv(path: str | Path, task: TaskSpec) -> list[Example]:
    """Parse one labelled GLUE TSV file of `task` into examples."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # drops MRPC's BOM
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # final newline (CoLA's dev file has none)
    needed = max(max(task.tsv_text_columns), task.tsv_label_column) + 1
    examples = []
    for number, line in enumerate(lines, start=1):
        if number == 1 and task.header:
            continue
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cells = line.split("\t")
        where = f"{path}, line {number}"
        if task.tsv_columns is not None and len(cells) != task.tsv_columns:
            raise UserError(
                f"{where}: {len(cells)} tab-separated columns, {task.name} files have "
                f"{task.tsv_columns}; fix or remove that line (tabs inside a sentence break rows)"
            )
        if len(cells) < needed:
            raise UserError(
                f"{where}: {len(cells)} tab-separated columns, {task.name} files need at least "
                f"{needed}; fix or remove that line"
            )
        texts = tuple(cells[i] for i in task.tsv_text_columns)
        examples.append(Example(texts, _label(cells[task.tsv_label_column].strip(), task, where)))
    if not examples:
        raise UserError(f"{path} holds no examples; point data.glue_dir at the full GLUE files")
    return examples


def _label(cell: str, task: TaskSpec, where: str) -> int | float:
    if task.is_regression:
        try:
            return float(cell)
        except ValueError:
            raise UserError(
                f"{where}: score '{cell}' is not a number; {task.name} needs a numeric score in "
                "the last column (fix or remove that line)"
            ) from None
    if cell not in task.labels:
        raise UserError(
            f"{where}: unknown label '{cell}'; {task.name} labels are "
            f"{', '.join(task.labels)} (fix or remove that line)"
        )
    return task.labels.index(cell)
