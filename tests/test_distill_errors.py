"""Errors the user can fix: exit code 2, one line on stderr naming the problem, nothing lost.

Four cases run the real CLI end to end (the reporting mechanism); the others call
`lmdistill.distill.run` in-process on a composed config and check the `UserError` it raises.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_helpers import TINY, run_cli, write_corpus

from lmdistill.errors import UserError, _as_user_error

# a previous run's files in the output directory: none may be changed by a failing run
_EXISTING = {
    "notes.txt": "keep me\n",
    "summary.json": '{"steps": 5}\n',
    "logs/metrics.csv": "step,train/loss\n0,1.0\n",
    "logs/hparams.yaml": "seed: 1\n",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("errors")
    write_corpus(path / "corpus.txt")
    (path / "empty.txt").write_text("\n\n   \n")
    (path / "short.txt").write_text("One short sentence here. Another one follows it.\n")
    (path / "latin1.txt").write_bytes("Caf\u00e9 au lait.\n".encode("latin-1"))
    (path / "not_a_checkpoint.ckpt").write_text("this is a text file, not a checkpoint\n")
    return path


def _prefill(out: Path) -> None:
    for name, text in _EXISTING.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def _assert_untouched(out: Path) -> None:
    for name, text in _EXISTING.items():
        assert (out / name).read_text() == text, name
    assert not (out / "student").exists()
    assert not (out / "checkpoints").exists()


def _assert_one_error_line(code: int, stderr: str, *words: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr  # nothing else on stderr: no warnings, no Lightning banner
    assert lines[0].startswith("lmdistill: error: "), stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


# --- through the real CLI ----------------------------------------------------------------------

CLI_CASES = {
    "relation_heads": (["method.relation_heads=5"], ["relation_heads=5", "divide", "32"]),
    "teacher_path": (
        ["teacher.name_or_path=/nonexistent/model"],
        ["/nonexistent/model", "does not exist"],
    ),
    "empty_corpus": (["data.paths=[{w}/empty.txt]"], ["empty", "empty.txt"]),
    # fewer pairs than a batch: every epoch ended without a step, forever
    "short_corpus": (["data.paths=[{w}/short.txt]"], ["fewer than one batch", "batch_size=8"]),
    # a second file that is not UTF-8 failed mid-build with a traceback
    "not_utf8": (
        ["data.paths=[{w}/corpus.txt,{w}/latin1.txt]"],
        ["latin1.txt is not UTF-8", "convert it"],
    ),
    "text_checkpoint": (
        ["ckpt_path={w}/not_a_checkpoint.ckpt"],
        ["not_a_checkpoint.ckpt", "checkpoint"],
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_reports_user_errors(case, workdir, cache_dir):
    overrides, words = CLI_CASES[case]
    out = workdir / f"out_{case}"
    _prefill(out)
    args = [*TINY, f"data.paths=[{workdir}/corpus.txt]", "trainer.max_steps=2"]
    args += [o.format(w=workdir) for o in overrides] + [f"hydra.run.dir={out}"]
    code, _, stderr = run_cli(args, workdir, cache_dir, timeout=120)
    _assert_one_error_line(code, stderr, *words)
    _assert_untouched(out)


# --- in-process: lmdistill.distill.run on a composed config ------------------------------------


def _config(workdir: Path, out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    base = [
        *TINY,
        f"data.paths=[{workdir}/corpus.txt]",
        "trainer.max_steps=2",
        f"paths.output_dir={out}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("distill", overrides=base + overrides)


IN_PROCESS_CASES = {
    "v1_heads": (["method=minilm_v1", "student.num_attention_heads=2"], r"same number of attention heads.*\(4\).*\(2\)"),
    "hidden_not_divisible": (["student.hidden_size=30"], r"hidden_size=30 is not divisible by .*num_attention_heads=4"),
    "glob_matches_nothing": (["data.paths=[{w}/nothing-*.txt]"], r"nothing-\*\.txt' matches no file"),
    "missing_checkpoint": (["ckpt_path={w}/missing.ckpt"], r"checkpoint .*missing\.ckpt does not exist"),
    "checkpoint_directory": (["ckpt_path={w}"], r"checkpoint .* is a directory, not a checkpoint file; pass the checkpoints/last\.ckpt"),
    "no_data_paths": (["data.paths=null"], r"source=text needs data paths"),
    "relation_heads_student": (["student.hidden_size=30", "student.num_attention_heads=3"], r"relation_heads=4 does not divide the student hidden size 30"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(IN_PROCESS_CASES))
def test_run_raises_user_errors(case, workdir, cache_dir):
    from lmdistill.distill import run

    overrides, pattern = IN_PROCESS_CASES[case]
    out = workdir / f"inproc_{case}"
    _prefill(out)
    cfg = _config(workdir, out, [o.format(w=workdir) for o in overrides])
    with pytest.raises(Exception) as info:
        run(cfg)
    error = _as_user_error(info.value)  # what the CLI decorator reports (Hydra may wrap it)
    assert isinstance(error, UserError), info.value
    assert re.search(pattern, str(error)), str(error)
    assert "\n" not in str(error)
    _assert_untouched(out)


ASSISTANT_CASES = {
    "sparse_student": (["method=sparse_minilm"], r"method=sparse_minilm takes no teacher assistant"),
    "ofa_student": (["method=ofa_minilm"], r"ofa_minilm with an assistant.*set assistant\.method"),
    "ofa_assistant": (["assistant.method=ofa_minilm"], r"assistant\.method=ofa_minilm cannot.*minilm_v2"),
    "unknown_assistant": (["assistant.method=minilm_v3"], r"assistant\.method=minilm_v3 cannot.*tinybert"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ASSISTANT_CASES))
def test_assistant_refuses_what_cannot_train_it(case, workdir, cache_dir):
    """Before any work: nothing sparsified, trained or written."""
    from lmdistill.assistant import run_with_assistant

    overrides, pattern = ASSISTANT_CASES[case]
    out = workdir / f"assistant_{case}"
    _prefill(out)
    cfg = _config(workdir, out, ["assistant=default", *overrides])
    with pytest.raises(UserError, match=pattern) as info:
        run_with_assistant(cfg)
    assert "\n" not in str(info.value)
    _assert_untouched(out)


def test_missing_mandatory_value_is_a_user_error(workdir, cache_dir):
    """`data=text` without data.paths: `???` becomes one line naming the key (the decorator's path)."""
    from omegaconf import OmegaConf

    cfg = _config(workdir, workdir / "unused", [])
    OmegaConf.update(cfg, "data.paths", "???")
    with pytest.raises(Exception) as info:
        OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    error = _as_user_error(info.value)
    assert error is not None and "data.paths" in str(error) and "data.paths=..." in str(error)


def test_existing_export_is_never_overwritten(workdir, cache_dir):
    from lmdistill.distill import run

    out = workdir / "inproc_existing_export"
    _prefill(out)
    (out / "student").mkdir()
    (out / "student" / "config.json").write_text("{}\n")
    cfg = _config(workdir, out, [])
    with pytest.raises(UserError, match="student already exists"):
        run(cfg)
    assert (out / "student" / "config.json").read_text() == "{}\n"
    for name, text in _EXISTING.items():
        assert (out / name).read_text() == text, name


def test_data_text_without_paths_via_cli(workdir, cache_dir):
    """data=text with no data.paths at all: the `???` in data/text.yaml, end to end."""
    out = workdir / "out_no_paths"
    _prefill(out)
    code, _, stderr = run_cli(
        [
            "teacher=tiny",
            "student=tiny",
            "data=text",
            "trainer.max_steps=1",
            f"hydra.run.dir={out}",
        ],
        workdir,
        cache_dir,
        timeout=120,
    )
    _assert_one_error_line(code, stderr, "data.paths")
    _assert_untouched(out)
