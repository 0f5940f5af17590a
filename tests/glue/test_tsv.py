"""Parsing every GLUE task's TSV format, and one clear error for malformed files."""

from __future__ import annotations

import pytest
from glue_files import write_glue

from lmdistill.errors import UserError
from lmdistill.glue import TASKS, get_task
from lmdistill.glue.tsv import read_tsv, task_file


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


def _read(glue_dir, task, split="dev"):
    spec = get_task(task)
    return read_tsv(task_file(glue_dir, spec, split), spec)


def test_cola_without_header_or_final_newline(glue_dir):
    assert not (glue_dir / "CoLA" / "dev.tsv").read_text().endswith("\n")
    examples = _read(glue_dir, "cola")
    assert len(examples) == 8  # the first line is data, the last is not lost
    assert examples[0].texts == ("A man is playing a guitar.",)
    assert [e.label for e in examples[:3]] == [0, 1, 0]


def test_sst2_header(glue_dir):
    examples = _read(glue_dir, "sst2")
    assert len(examples) == 8
    assert examples[1].texts == ("The cat sleeps on the sofa. ",)
    assert examples[1].label == 1


def test_mrpc_bom_and_literal_quotes(glue_dir):
    assert (glue_dir / "MRPC" / "dev.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    examples = _read(glue_dir, "mrpc")
    assert len(examples) == 8  # the BOM'd header is skipped, not read as a row
    assert examples[0].texts == ('"A man is playing a guitar.', "A man plays the guitar.")
    assert [e.label for e in examples[:2]] == [0, 1]


def test_stsb_regression_score_in_last_column(glue_dir):
    examples = _read(glue_dir, "stsb")
    assert [e.label for e in examples[:3]] == [0.0, 0.625, 1.25]
    assert all(isinstance(e.label, float) for e in examples)
    assert examples[2].texts == ("Prices rose sharply in May.", "Prices went up a lot in May.")
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1


def test_rte_and_qnli_string_labels(glue_dir):
    for task in ("rte", "qnli"):
        examples = _read(glue_dir, task)
        assert [e.label for e in examples[:4]] == [0, 1, 0, 1]  # entailment = 0, as on the hub
        assert len(examples[0].texts) == 2


def test_wnli_numeric_labels(glue_dir):
    examples = _read(glue_dir, "wnli")
    assert [e.label for e in examples[:2]] == [0, 1]
    assert examples[1].texts == ("The cat sleeps on the sofa.", "A dog runs in the park.")


def test_task_names():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb"
    assert get_task("mnli").metric_names() == ["matched_accuracy", "mismatched_accuracy"]
    with pytest.raises(UserError, match="unknown task 'mrcp'; use one of cola"):
        get_task("mrcp")


MALFORMED = {
    "column_count": ("RTE", "rte", "0\tonly two columns\n", "2 tab-separated columns, rte files have 4"),
    "stsb_score": (
        "STS-B", "stsb", "1\tg\tf\ty\t1\tn\tn\tA b.\tC d.\thigh\n", "score 'high' is not a number"
    ),
    "rte_label": ("RTE", "rte", "1\tA b.\tC d.\tmaybe\n", "unknown label 'maybe'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_rows_name_file_line_and_fix(case, tmp_path):
    folder, task, bad_line, problem = MALFORMED[case]
    root = write_glue(tmp_path)
    path = root / folder / "dev.tsv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + bad_line + "".join(lines[3:]))
    with pytest.raises(UserError) as info:
        _read(root, task)
    message = str(info.value)
    assert f"{path}, line 4" in message and problem in message
    assert "fix or remove that line" in message and "\n" not in message


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="does not exist; set data.glue_dir"):
        task_file(tmp_path / "nowhere", get_task("rte"), "train")
    with pytest.raises(UserError, match=r"RTE/train.tsv is missing"):
        task_file(tmp_path, get_task("rte"), "train")
