"""Benchmark one relation KL (forward + backward): naive autograd vs the fast path.

Setting (DESIGN.md, "Where the time goes"): B=32, L=128, R=32, d=384 for teacher and student,
half of the batch padded to half length, float32, 2 threads, one (Q, K)-style relation.

    python benchmarks/relation_loss.py                 # naive vs fast, speedup in the same run
    python benchmarks/relation_loss.py --strategies    # also: group / per_sequence / masked (the GPU path)
    python benchmarks/relation_loss.py --sweep-chunk   # also: chunk sizes of the fast path

Peak extra memory is the growth of the process's peak RSS (VmHWM) over the step, each
variant measured in a fresh subprocess; saved-for-backward bytes are counted with
`torch.autograd.graph.saved_tensors_hooks`.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

from lmdistill import _relation_kernel as kernel
from lmdistill.losses import relation_kl, relation_scores


def naive_relation_kl(teacher, student, attention_mask, num_heads):
    """Plain autograd on the padded batch (what straightforward code does); reduction "rows"."""
    with torch.no_grad():
        s_t = relation_scores(*teacher, attention_mask, num_heads)
        log_p = torch.log_softmax(s_t, -1)
    s_s = relation_scores(*student, attention_mask, num_heads)
    kl = (log_p.exp() * (log_p - torch.log_softmax(s_s, -1))).sum(-1)
    valid = (attention_mask != 0).to(torch.float32)[:, None, :].expand_as(kl)
    return (kl * valid).sum() / valid.sum()


def make_inputs(batch=32, length=128, d_teacher=384, d_student=384, seed=0):
    """Teacher/student (Q, K) projections and a mask: half the batch padded to half length."""
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(batch, length, d_teacher, generator=g) for _ in range(2)]
    s = [torch.randn(batch, length, d_student, generator=g).requires_grad_() for _ in range(2)]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[batch // 2 :, length // 2 :] = 0
    return t, s, mask


def _step(variant, t, s, mask, num_heads):
    for x in s:
        x.grad = None
    if variant == "naive":
        loss = naive_relation_kl(tuple(t), tuple(s), mask, num_heads)
    else:
        loss = relation_kl(tuple(t), tuple(s), mask, num_heads)
    loss.backward()
    return loss


def _saved_bytes(variant, t, s, mask, num_heads):
    seen = {}

    def pack(x):
        seen[(x.untyped_storage().data_ptr(), x.dtype)] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _step(variant, t, s, mask, num_heads)
    return sum(seen.values())


def _configure(variant):
    kernel.STRATEGY = {"fast": "group"}.get(variant, variant.replace("fast_", ""))


def measure_relation_loss(
    batch=32,
    length=128,
    num_heads=32,
    d_teacher=384,
    d_student=384,
    variants=("naive", "fast"),
    repeats=5,
    threads=2,
    rss=True,
):
    """ms per forward+backward (median of `repeats`), saved-for-backward MB and peak extra RSS MB
    per variant; variants: "naive", "fast" (= "fast_group"), "fast_per_sequence",
    "fast_masked" (the GPU path). Also returns the loss values and `speedup` = naive / fast when both ran."""
    torch.set_num_threads(threads)
    t, s, mask = make_inputs(batch, length, d_teacher, d_student)
    out = {
        "setting": dict(
            batch=batch,
            length=length,
            num_heads=num_heads,
            d_teacher=d_teacher,
            d_student=d_student,
            threads=threads,
            padded_half=True,
            torch=torch.__version__,
        )
    }
    for variant in variants:
        _configure(variant)
        loss = _step(variant, t, s, mask, num_heads)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _step(variant, t, s, mask, num_heads)
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        out[variant] = {
            "ms": times[len(times) // 2],
            "ms_min": times[0],
            "loss": loss.item(),
            "saved_mb": _saved_bytes(variant, t, s, mask, num_heads) / 2**20,
        }
        if rss:
            out[variant]["peak_extra_rss_mb"] = _rss_in_subprocess(
                variant, batch, length, num_heads, d_teacher, d_student, threads
            )
    _configure("fast")
    if "naive" in out and "fast" in out:
        out["speedup"] = out["naive"]["ms"] / out["fast"]["ms"]
    return out


def _rss_in_subprocess(variant, *args):
    cmd = [sys.executable, __file__, "--rss-child", variant, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _peak_rss_kib():
    """Peak RSS of this process image in KiB: VmHWM (unlike ru_maxrss, not inherited from the
    parent across fork + exec); falls back to ru_maxrss off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_child(variant, batch, length, num_heads, d_teacher, d_student, threads):
    torch.set_num_threads(threads)
    _configure(variant)
    # warm-up on a tiny batch: loads library code and thread pools, which also count as RSS
    _step(variant, *make_inputs(2, 16, d_teacher, d_student), num_heads)
    t, s, mask = make_inputs(batch, length, d_teacher, d_student)
    before = _peak_rss_kib()
    _step(variant, t, s, mask, num_heads)
    after = _peak_rss_kib()
    print((after - before) / 1024)  # KiB on Linux -> MiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", action="store_true")
    p.add_argument("--sweep-chunk", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rss-child", nargs=7)
    args = p.parse_args(argv)
    if args.rss_child:
        v, *nums = args.rss_child
        return _rss_child(v, *map(int, nums))
    variants = ["naive", "fast"]
    if args.strategies:
        variants += ["fast_per_sequence", "fast_masked"]
    res = measure_relation_loss(variants=variants, repeats=args.repeats, threads=args.threads)
    print(json.dumps(res, indent=1))
    for v in variants:
        r = res[v]
        print(
            f"{v:18s} {r['ms']:8.1f} ms/step (min {r['ms_min']:.1f})  saved {r['saved_mb']:7.1f} MB"
            f"  peak extra RSS {r.get('peak_extra_rss_mb', math.nan):7.1f} MB  loss {r['loss']:.6f}"
        )
    print(f"speedup naive/fast: {res['speedup']:.2f}x")
    if args.sweep_chunk:
        default = kernel.CHUNK_ELEMENTS
        for exp in range(15, 23):
            kernel.CHUNK_ELEMENTS = 1 << exp
            r = measure_relation_loss(
                variants=("fast",), repeats=args.repeats, threads=args.threads, rss=False
            )["fast"]
            print(f"CHUNK_ELEMENTS=2^{exp}: {r['ms']:.1f} ms (min {r['ms_min']:.1f})")
        kernel.CHUNK_ELEMENTS = default


if __name__ == "__main__":
    main()
