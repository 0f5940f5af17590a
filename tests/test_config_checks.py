"""Obviously bad config values: one line naming the value and the fix, exit 2, nothing written.

One case runs the real CLI (the reporting path); the others call `lmdistill.distill.run`
in-process on a composed config, which must raise the `UserError` before building anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import TINY, compose_distill, run_cli, write_corpus

from lmdistill.config_checks import check_config
from lmdistill.errors import UserError

BAD = {
    "optim.lr=-1": "optim.lr=-1 must be a positive number; e.g. optim.lr=3e-4",
    "optim.lr=0": "optim.lr=0 must be a positive number; e.g. optim.lr=3e-4",
    "optim.lr=-0.5": "optim.lr=-0.5 must be a positive number; e.g. optim.lr=3e-4",
    "trainer.accumulate_grad_batches=0": (
        "trainer.accumulate_grad_batches=0 must be a positive integer; "
        "e.g. trainer.accumulate_grad_batches=1"
    ),
    "seed=abc": "seed=abc must be an integer; e.g. seed=1",
    "seed=1.5": "seed=1.5 must be an integer; e.g. seed=1",
    "method.relation_weights=qq:1": (
        "method.relation_weights=qq:1 is not a mapping (an unquoted dict is read as a string); "
        "write it as a dict in braces, quoted for the shell, e.g. "
        "'method.relation_weights={qq: 1, kk: 1, vv: 1}', or set one weight: "
        "method.relation_weights.qq=1"
    ),
    "data.batch_size=0": "data.batch_size=0 must be a positive integer; e.g. data.batch_size=32",
    "trainer.max_steps=0": (
        "trainer.max_steps=0 must be a positive integer: a distillation trains that many "
        "optimizer steps; e.g. trainer.max_steps=1000"
    ),
    "trainer.max_steps=-1": (
        "trainer.max_steps=-1 must be a positive integer: a distillation trains that many "
        "optimizer steps; e.g. trainer.max_steps=1000"
    ),
}

GOOD = [
    [],
    ["method=minilm_v1"],
    ["method=minimoe"],
    ["assistant=default"],
    ["experiment=minimoe_bert-base_L3"],
    ["method.relation_weights={qq: 1, kk: 0, vv: 2}"],
    ["method.relation_weights.qq=0.5", "optim.lr=1e-3", "seed=0"],
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> Path:
    path = tmp_path_factory.mktemp("config-checks")
    write_corpus(path / "corpus.txt")
    return path


@pytest.mark.parametrize("override", sorted(BAD))
def test_run_refuses_bad_values_before_building(override, workdir, cache_dir):
    from lmdistill.distill import run

    out = workdir / "out"
    cfg = compose_distill([*TINY, f"data.paths=[{workdir}/corpus.txt]", override,
                           f"paths.output_dir={out}"])  # fmt: skip
    with pytest.raises(UserError) as info:
        run(cfg)
    assert str(info.value) == BAD[override]
    assert not out.exists()


@pytest.mark.parametrize("overrides", GOOD, ids=lambda o: " ".join(o) or "defaults")
def test_shipped_configs_pass(overrides, monkeypatch, cache_dir):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # experiments: 16-mixed GPUs
    check_config(compose_distill(overrides))


def test_cli_prints_one_line_and_exits_2(workdir, cache_dir):
    out = workdir / "cli"
    args = [*TINY, f"data.paths=[{workdir}/corpus.txt]", "trainer.max_steps=2",
            "method.relation_weights=qq:1", f"hydra.run.dir={out}"]  # fmt: skip
    code, _, stderr = run_cli(args, workdir, cache_dir, timeout=120)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"lmdistill: error: {BAD['method.relation_weights=qq:1']}"], stderr
    assert not (out / "student").exists() and not (out / "checkpoints").exists()
