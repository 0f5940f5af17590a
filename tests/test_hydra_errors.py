"""Hydra's config errors (a misspelt group option or key, an unparsable override) through the
real CLIs: one `lmdistill: error:` line with the fix, exit code 2, no job directory made;
`HYDRA_FULL_ERROR=1` still shows Hydra's traceback."""

from __future__ import annotations

import pytest
from cli_helpers import cli_env, run_cli
from test_distill_errors import _assert_one_error_line

CASES = {
    "group_option": (
        "lmdistill.distill",
        ["student=L3-H385"],
        [
            "no student 'L3-H385' in conf/student",
            "did you mean student=L3-H384?",
            "L12-H384, L3-H384",
        ],
    ),
    "misspelt_key": (
        "lmdistill.distill",
        ["trainer.max_stepz=5"],
        ["no key trainer.max_stepz", "did you mean trainer.max_steps?", "+trainer.max_stepz=..."],
    ),
    "unknown_key": (
        "lmdistill.distill",
        ["method=minilm_v2", "method.bogus=1"],
        ["no key method.bogus", "method has:", "relation_heads", "+method.bogus=..."],
    ),
    "method_block_without_its_method": (  # not "+ofa.layers=...": minilm_v2 would ignore it
        "lmdistill.distill",
        ["ofa.layers=[2,1]"],
        ["no key ofa.layers: ofa.* settings belong to method=ofa_minilm; add method=ofa_minilm"],
    ),
    "malformed": (
        "lmdistill.distill",
        ["trainer.max_steps=["],
        ["cannot parse the override 'trainer.max_steps=['", "override_grammar"],
    ),
    "sweep_option": (
        "lmdistill.distill",
        ["-m", "student=L3-H384,L3-H385"],
        ["no student 'L3-H385' in conf/student", "did you mean student=L3-H384?"],
    ),
    "finetune_key": (
        "lmdistill.finetune",
        ["trainer.max_stepz=5"],
        ["no key trainer.max_stepz", "did you mean trainer.max_steps?"],
    ),
    "sparsify_sweep_key": (
        "lmdistill.sparsify",
        ["-m", "num_batchez=1,2"],
        ["no key num_batchez", "did you mean num_batches?", "+num_batchez=..."],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_error_is_one_line(case, tmp_path, cache_dir):
    module, overrides, words = CASES[case]
    out = tmp_path / "out"
    args = [*overrides, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"]
    code, _, stderr = run_cli(args, tmp_path, cache_dir, module=module, timeout=120)
    _assert_one_error_line(code, stderr, *words)
    assert "HYDRA_FULL_ERROR" not in stderr and "Config search path" not in stderr, stderr
    made = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert made in ([], ["multirun.yaml"]), made  # Hydra's sweeper saves it before composing jobs


def test_full_error_keeps_the_traceback(tmp_path, cache_dir):
    env = cli_env(cache_dir, HYDRA_FULL_ERROR="1")
    args = ["trainer.max_stepz=5", f"hydra.run.dir={tmp_path / 'out'}"]
    code, _, stderr = run_cli(args, tmp_path, cache_dir, timeout=120, env=env)
    assert code != 0
    assert "Traceback" in stderr and "ConfigCompositionException" in stderr, stderr
    assert "lmdistill: error" not in stderr, stderr
