"""Tiny GLUE-format files, written the way the original download has them."""

from __future__ import annotations

from pathlib import Path

_PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar."),
    ("The cat sleeps on the sofa.", "A dog runs in the park."),
    ("Prices rose sharply in May.", "Prices went up a lot in May."),
    ("She closed the window.", "The window was left open."),
]


def write_glue(root: Path, rows: int = 8) -> Path:
    """CoLA, SST-2, MRPC, STS-B, RTE, WNLI, QNLI train and dev files with `rows` examples each."""
    pairs = [_PAIRS[i % len(_PAIRS)] for i in range(rows)]
    files = {
        # no header; the dev file has no final newline
        "CoLA": lambda split: (
            "\n".join(f"gj04\t{i % 2}\t\t{a}" for i, (a, _) in enumerate(pairs))
            + ("\n" if split == "train" else "")
        ),
        "SST-2": lambda split: (
            "sentence\tlabel\n" + "".join(f"{a} \t{i % 2}\n" for i, (a, _) in enumerate(pairs))
        ),
        # UTF-8 BOM, literal quotes
        "MRPC": lambda split: (
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            + "".join(
                f'{i % 2}\t{100 + i}\t{200 + i}\t"{a}\t{b}\n' for i, (a, b) in enumerate(pairs)
            )
        ),
        # score in the last of 10 columns
        "STS-B": lambda split: (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\t"
            "sentence1\tsentence2\tscore\n"
            + "".join(
                f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{i * 0.625:.3f}\n"
                for i, (a, b) in enumerate(pairs)
            )
        ),
        "RTE": lambda split: (
            "index\tsentence1\tsentence2\tlabel\n"
            + "".join(
                f"{i}\t{a}\t{b}\t{'not_entailment' if i % 2 else 'entailment'}\n"
                for i, (a, b) in enumerate(pairs)
            )
        ),
        "WNLI": lambda split: (
            "index\tsentence1\tsentence2\tlabel\n"
            + "".join(f"{i}\t{a}\t{b}\t{i % 2}\n" for i, (a, b) in enumerate(pairs))
        ),
        "QNLI": lambda split: (
            "index\tquestion\tsentence\tlabel\n"
            + "".join(
                f"{i}\t{a}?\t{b}\t{'not_entailment' if i % 2 else 'entailment'}\n"
                for i, (a, b) in enumerate(pairs)
            )
        ),
    }
    for task, text in files.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev"):
            (root / task / f"{split}.tsv").write_text(text(split), encoding="utf-8")
    return root
