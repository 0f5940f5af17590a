"""The teacher-assistant CLI runs that tests/test_assistant.py and tests/test_assistant_chain.py
share: made once per session by the `assistant_runs` fixture (tests/conftest.py).

Every run of the chain command trains a 2 x 16 assistant for 3 steps, then a 1 x 16 student for
4 (global steps 0-2 and 3-6). Caches (`LMDISTILL_CACHE`, or `paths.cache_dir`) under the work
directory:

    cache    chain     the chain command (CSV and offline W&B): trains both stages
             D         the chain command with a 2 x 16 student, crashes in stage 2 after its
                       step-2 checkpoint (its assistant is chain's: a stage-2-only run)
             sweep/    the chain command, -m seed=776,1 student.num_hidden_layers=1,2:
                         reused  seed 776, 1 layer: chain's command again (assistant cached)
                         E       seed 776, 2 layers: D's configuration, continues D
                         C       seed 1, 1 then 2 layers: one new assistant for both jobs
             F         a MiniMoE student behind chain's (dense, minilm_v2) assistant
    plain    plain1    teacher -> 2 x 16 for 3 steps: the run stage 1 stands for
             plain2    chain's assistant -> 1 x 16 for 4 steps: the run stage 2 stands for
    stage1, switch, stage2
             crash_*   the chain command, crashing after its step-1, step-3 and step-5
                       checkpoint (one cache each: each trains its own assistant)
             resumed/  -m paths.cache_dir=<stage1>,<switch>: re-running continues each
             resumed_stage2  ckpt_path=last continues crash_stage2
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cli_helpers import TINY, check_ok, cli_env, run_cli, write_corpus

# a 1 x 16 student of the 2 x 32 tiny teacher: the default assistant is 2 x 16
SHAPE = ["student.num_hidden_layers=1", "student.hidden_size=16", "student.intermediate_size=32"]
CHAIN = ["assistant=default", *SHAPE, "assistant.max_steps=3", "trainer.max_steps=4"]
SEED = 776  # distill.yaml's default, spelled out so that a sweep can list it with another
# last.ckpt after every step; the crash ends the run after its step-(k - 1) checkpoint
CRASH = ["callbacks.model_checkpoint.every_n_train_steps=1",
         "+callbacks.crash._target_=crash_callback.CrashAtStep"]  # fmt: skip
# crash at the end of global step k - 1 (last.ckpt holds k - 1 steps): resume inside stage 1,
# exactly at the switch (step 3), inside stage 2
RESUME_AT = {"stage1": 1, "switch": 3, "stage2": 5}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def sweep_jobs(sweep: Path) -> list[Path]:
    """The job directories of a sweep (`<job number>_<overrides>`), in the order they ran."""
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    return sorted(jobs, key=lambda p: int(p.name.split("_", 1)[0]))


def make_runs(work: Path) -> dict[str, Path]:
    """Every run above, in `work`; {name: run directory} (sweep jobs by the names above, C's
    two jobs as C1 and C2 in the order they ran)."""
    corpus = write_corpus(work / "corpus.txt")
    tests = str(Path(__file__).parent)
    pythonpath = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])

    def cli(out: str, cache: str, *args: str, seed: str = str(SEED), sweep: bool = False):
        env = cli_env(work / cache, PYTHONPATH=pythonpath)
        where = f"hydra.sweep.dir={work / out}" if sweep else f"hydra.run.dir={work / out}"
        args = [*TINY, f"data.paths=[{corpus}]", f"seed={seed}", *args, where]
        return run_cli(["-m", *args] if sweep else args, work, work / cache, env=env)

    check_ok(cli("chain", "cache", *CHAIN, "logger=[csv,wandb]"))
    crash_d = ["callbacks.model_checkpoint.every_n_train_steps=2",
               "+callbacks.crash._target_=crash_callback.CrashAtStep", "+callbacks.crash.step=3"]  # fmt: skip
    code, _, err = cli("D", "cache", *CHAIN, "student.num_hidden_layers=2", *crash_d)
    assert code != 0 and "simulated crash at step 3" in err
    layers = "student.num_hidden_layers=1,2"
    check_ok(cli("sweep", "cache", *CHAIN, layers, seed=f"{SEED},1", sweep=True))
    check_ok(cli("F", "cache", *CHAIN, "method=minimoe", "assistant.method=minilm_v2"))

    # the two runs the chain stands for: teacher -> assistant, assistant -> student
    assistant = summary(work / "chain")["assistant"]["export_dir"]
    check_ok(cli("plain1", "plain", *SHAPE[1:], "trainer.max_steps=3"))
    check_ok(cli("plain2", "plain", *SHAPE, "trainer.max_steps=4",
                 f"teacher.name_or_path={assistant}"))  # fmt: skip

    for where, step in RESUME_AT.items():
        code, _, err = cli(
            f"crash_{where}", where, *CHAIN, *CRASH, f"+callbacks.crash.step={step + 1}"
        )
        assert code != 0 and "simulated crash" in err
    # stage 1 and the switch: re-running the command continues it (one sweep, a job per cache)
    caches = ",".join(str(work / where) for where in ("stage1", "switch"))
    check_ok(cli("resumed", "stage1", *CHAIN, f"paths.cache_dir={caches}", sweep=True))
    check_ok(cli("resumed_stage2", "stage2", *CHAIN, "ckpt_path=last"))

    jobs = sweep_jobs(work / "sweep")
    by_config = {(summary(j)["seed"], summary(j)["student"]["num_hidden_layers"]): j for j in jobs}
    assert sorted(by_config) == [(1, 1), (1, 2), (SEED, 1), (SEED, 2)], by_config
    c1, c2 = (j for j in jobs if summary(j)["seed"] == 1)
    names = ["chain", "D", "F", "plain1", "plain2", "resumed_stage2",
             *(f"crash_{where}" for where in RESUME_AT)]  # fmt: skip
    return {
        "work": work,
        **{name: work / name for name in names},
        "reused": by_config[(SEED, 1)],
        "E": by_config[(SEED, 2)],
        "C1": c1,
        "C2": c2,
        **dict(
            zip(("resumed_stage1", "resumed_switch"), sweep_jobs(work / "resumed"), strict=True)
        ),
    }
