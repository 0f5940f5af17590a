"""The framework's overhead per step, measurable without a GPU: tiny models, where a step is
mostly overhead, trained by lmdistill (Lightning, the real config and module) and by a plain
PyTorch loop doing the same math on the same batches.

    python benchmarks/step_overhead.py                          # 8 rounds of 100 steps (~2 min)
    python benchmarks/step_overhead.py --steps 60 --rounds 2    # smoke check (one logging step)
    python benchmarks/step_overhead.py --batch-size 32 --seq-len 128   # the default data shape

Setting: `teacher=tiny student=tiny` (2 x 32 random BERT into 2 x 32, 4 relation heads),
MiniLM v2, float32, batch 8 x 32 tokens of the sample corpus (pre-built once, so data loading
is outside both), grad-norm clip 5.0, fused AdamW with linear warmup/decay. The batch is small
so that the step is mostly overhead (about 8 ms of math): at the data config's 32 x 128 the tiny
models' step is about 90 ms of math (mostly dropout masks of the 128 x 128 attention), and the
machine's noise between runs (+-5%) is larger than the overhead being measured. Per step, both compute: teacher
Q/K/V (inference mode, truncated), student Q/K/V of its last layer, 3 relation KLs, backward,
clip, AdamW, scheduler.

* lmdistill: `trainer.fit` on the module and Trainer that `lmdistill-distill` builds from its
  config (`trainer.log_every_n_steps` as configured, 50 by default), without loggers, progress bar
  or checkpoints (they run at intervals, not per step). Time of a step: from one
  `on_train_batch_start` to the next, median over the timed steps.
* plain: the same module's `step_loss` (same kernels, same masks) driven by a hand-written loop:
  backward, clip, fused AdamW, scheduler; no Lightning, no counters, no logging. The difference is
  what Lightning and lmdistill's bookkeeping add per step.
* host reads: `lmdistill.host_reads.HostReadCounter` in a separate run of lmdistill (patching
  costs time): reads of tensor values per step, steady state and per logging interval.

The two loops take turns (`--rounds`), each round building a fresh module; the overhead is the
median over rounds of (lmdistill's median step - the plain loop's median step), which a noisy
round does not move.

Targets (issue "Fast where researchers actually train", item 5): at most 2 ms per step above the
plain loop; at most one host read per logging interval. Results: stdout and
bench-results/step_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from _framework import compose, quiet_overrides  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

BASE_OVERRIDES = ["teacher=tiny", "student=tiny", "method=minilm_v2", "trainer.precision=32",
                  "data.num_workers=0", "data.val_batches=0"]  # fmt: skip
OVERRIDES = list(BASE_OVERRIDES)  # + the batch shape, set by `main`


class MathClock:
    """Wall time inside the math both loops share: `step_loss` (forward) and the backward pass.

    A step minus this is what each loop does around the math; the difference of those is the
    framework's own work, and the difference of the math times shows whether running inside
    Lightning slows the math itself (both are printed: the machine is shared and noisy).
    """

    def __init__(self):
        self.seconds: list[float] = []  # per step: forward + backward

    def wrap(self, module) -> None:
        step_loss, backward = module.step_loss, module.backward

        def timed_step_loss(batch):
            start = time.perf_counter()
            out = step_loss(batch)
            self.seconds.append(time.perf_counter() - start)
            return out

        def timed_backward(loss, *args, **kwargs):
            start = time.perf_counter()
            backward(loss, *args, **kwargs)
            self.seconds[-1] += time.perf_counter() - start

        module.step_loss, module.backward = timed_step_loss, timed_backward


class StepClock(L.Callback):
    """Wall time from one `on_train_batch_start` to the next (a whole loop iteration)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def step_seconds(self, warmup: int) -> list[float]:
        return [
            b - a for a, b in zip(self.starts[warmup:], self.starts[warmup + 1 :], strict=False)
        ]


def _build(steps: int, out: Path, extra: list[str] = ()):
    from lmdistill.distill import build

    cfg = compose([*OVERRIDES, *quiet_overrides(), f"trainer.max_steps={steps}", *extra], out)
    L.seed_everything(cfg.seed, verbose=False)
    return cfg, *build(cfg)


def make_batches(steps: int, out: Path) -> list[dict]:
    """The first `steps` batches of the tiny run's real DataModule (epochs repeat)."""
    _, _, datamodule, _ = _build(steps, out)
    batches = []
    while len(batches) < steps:  # the sample corpus is small: several epochs if needed
        for batch in datamodule.train_dataloader():
            batches.append({k: v.clone() for k, v in batch.items()})
            if len(batches) == steps:
                break
    return batches


def run_framework(batches, out: Path, callbacks, math: MathClock | None = None) -> None:
    cfg, module, _, trainer = _build(len(batches), out)
    if math is not None:
        math.wrap(module)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def run_plain(batches, out: Path, warmup: int, math: MathClock) -> list[float]:
    """The same math by hand: no Lightning, no counters, no logging."""
    from transformers import get_linear_schedule_with_warmup

    cfg, module, _, _ = _build(len(batches), out)
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=cfg.optim.lr, eps=1e-6, fused=True)  # fmt: skip
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, len(batches))
    module.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        batch = module.on_before_batch_transfer(
            batch, 0
        )  # the host-side plan, as Lightning calls it
        math_start = time.perf_counter()
        loss, _ = module.step_loss(batch)  # teacher Q/K/V, student Q/K/V, 3 relation KLs
        loss.backward()
        math.seconds.append(time.perf_counter() - math_start)
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main(argv=None) -> None:
    from lmdistill.host_reads import HostReadCounter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="steps per round and loop")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=8, help="interleaved lmdistill/plain rounds")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32, help="data.max_seq_length")
    p.add_argument("--out", default="bench-results/step_overhead.json")
    args = p.parse_args(argv)
    OVERRIDES[:] = [*BASE_OVERRIDES, f"data.batch_size={args.batch_size}",
                    f"data.max_seq_length={args.seq_len}"]  # fmt: skip
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        batches = make_batches(args.steps, tmp / "data")
        interval = int(compose(OVERRIDES, tmp).trainer.log_every_n_steps)
        plain, framework, rounds = [], [], []
        math_fw, math_plain = MathClock(), MathClock()
        for round_ in range(args.rounds):  # interleaved: the machine is shared and noisy
            clock, fw_math, pl_math = StepClock(), MathClock(), MathClock()
            run_framework(batches, tmp / f"fw{round_}", [clock], fw_math)
            fw = clock.step_seconds(args.warmup)
            pl = run_plain(batches, tmp / f"plain{round_}", args.warmup, pl_math)
            framework += fw
            plain += pl
            math_fw.seconds += fw_math.seconds[args.warmup :]
            math_plain.seconds += pl_math.seconds[args.warmup :]
            rounds.append(1000 * (statistics.median(fw) - statistics.median(pl)))
        counter = HostReadCounter(where=True)
        run_framework(batches, tmp / "reads", [counter])
    reads = counter.per_step[args.warmup :]
    logging_steps = [r for i, r in enumerate(counter.per_step) if (i + 1) % interval == 0]
    other_steps = [r for i, r in enumerate(counter.per_step[1:], 1) if (i + 1) % interval]
    result = {
        "setting": {
            "steps": args.steps,
            "warmup": args.warmup,
            "log_every_n_steps": interval,
            "overrides": OVERRIDES,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "framework_ms": 1000 * statistics.median(framework),
        "plain_ms": 1000 * statistics.median(plain),
        "overhead_ms_per_round": [round(r, 2) for r in rounds],
        "math_framework_ms": 1000 * statistics.median(math_fw.seconds),
        "math_plain_ms": 1000 * statistics.median(math_plain.seconds),
        "host_reads_per_step_max": max(other_steps) if other_steps else None,
        "host_reads_per_logging_step": sorted(set(logging_steps)),
        "host_reads_mean_per_step": sum(reads) / len(reads),
        "host_read_sites": dict(counter.callers.most_common(10)),
    }
    result["overhead_ms"] = statistics.median(rounds)
    result["outside_math_ms"] = (result["framework_ms"] - result["math_framework_ms"]) - (
        result["plain_ms"] - result["math_plain_ms"]
    )  # the framework's own work per step
    print("| | ms per step (median) |\n|---|---|")
    print(f"| lmdistill (Lightning, real config) | {result['framework_ms']:.2f} |")
    print(f"| plain PyTorch loop, same math | {result['plain_ms']:.2f} |")
    print(f"| overhead per step (median of the rounds) | {result['overhead_ms']:.2f} "
          "(target <= 2) |")  # fmt: skip
    print(
        f"| - of which the framework's own work around the math | {result['outside_math_ms']:.2f} |"
    )
    print(f"| - forward + backward inside lmdistill / plain | {result['math_framework_ms']:.2f} / "
          f"{result['math_plain_ms']:.2f} |")  # fmt: skip
    print(f"overhead per round: {result['overhead_ms_per_round']} ms")
    print(f"\nhost reads: {result['host_reads_per_step_max']} per step between logging steps, "
          f"{result['host_reads_per_logging_step']} at each logging step "
          f"(every {interval} steps; target <= 1 per interval)")  # fmt: skip
    print("read sites:", result["host_read_sites"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
