"""MoE FFN forward + backward: lmdistill's sync-free dispatch vs the alternatives.

    python benchmarks/moe_dispatch.py [--batch 32 --length 128 --hidden 384 --ffn 1536 --experts 4]

Variants, all on the same layer, weights and padded batch (20 % padding), timed interleaved
(one repeat of every variant per round; medians and best of `--repeats` rounds):

grouped_mm: lmdistill's dispatch where `torch._grouped_mm` is sync-free (CPU, CUDA bf16 sm90+):
            sort by expert, group ends from `searchsorted`, grouped GEMMs, no host read;
tiled:      lmdistill's fallback (`_tiled_linear`: expert groups padded to tiles, one `bmm`),
            the path of CUDA float32/float16 and older GPUs, forced here;
host_sync:  the previous dispatch: the E counts read on the host (`.tolist()`, one sync per
            sublayer), then one `addmm` per expert on its slice, explicit backward;
masked:     every expert on every token, outputs multiplied by a one-hot mask (E x the compute);
loop:       a Python loop over tokens (the naive per-token dispatch), timed once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from transformers import BertConfig

from lmdistill.models import moe_routing
from lmdistill.models.moe import minimoe_config
from lmdistill.models.moe_layers import MiniMoEFeedForward


@contextmanager
def force_tiles():
    """Run `grouped_linear` through its tiled fallback."""
    original = moe_routing.grouped_mm_supported
    moe_routing.grouped_mm_supported = lambda x, weight: False
    try:
        yield
    finally:
        moe_routing.grouped_mm_supported = original


def grouped_mm(ffn, hidden, real):
    return ffn(hidden, real)[0]


def tiled(ffn, hidden, real):
    with force_tiles():
        return ffn(hidden, real)[0]


class _SliceLinear(torch.autograd.Function):
    """The previous grouped linear: one addmm per expert over host-known slice sizes."""

    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        out, start = x.new_empty(x.shape[0], weight.shape[-1]), 0
        for e, count in enumerate(counts):
            if count:
                torch.addmm(bias[e], x[start : start + count], weight[e],
                            out=out[start : start + count])  # fmt: skip
            start += count
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)
        grad_b, start = grad.new_zeros(weight.shape[0], weight.shape[-1]), 0
        for e, count in enumerate(ctx.counts):
            rows = slice(start, start + count)
            start += count
            if count:
                torch.mm(grad[rows], weight[e].t(), out=grad_x[rows])
                torch.mm(x[rows].t(), grad[rows], out=grad_w[e])
                torch.sum(grad[rows], 0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def host_sync(ffn, hidden, real):
    b, n, d = hidden.shape
    flat = hidden.reshape(b * n, d)
    stats, gate = ffn.router(flat, real)
    order = torch.argsort(stats.expert, stable=True)
    counts = torch.bincount(stats.expert, minlength=ffn.num_experts + 1).tolist()  # host sync
    order = order[: sum(counts[: ffn.num_experts])]
    counts = counts[: ffn.num_experts]
    x = ffn.act(_SliceLinear.apply(flat[order], ffn.in_weight, ffn.in_bias, counts))
    x = _SliceLinear.apply(x, ffn.out_weight, ffn.out_bias, counts) * gate[order, None]
    out = x.new_zeros(b * n, d).index_copy(0, order, x).view(b, n, d)
    return ffn.LayerNorm(hidden + ffn.dropout(out))


def masked(ffn, hidden, real):
    b, n, d = hidden.shape
    flat = hidden.reshape(b * n, d)
    stats, gate = ffn.router(flat, real)
    out = torch.zeros_like(flat)
    for e in range(ffn.num_experts):  # every expert computes every token
        y = ffn.act(flat @ ffn.in_weight[e] + ffn.in_bias[e]) @ ffn.out_weight[e] + ffn.out_bias[e]
        out = out + y * (stats.expert == e).to(y.dtype)[:, None]
    out = out * gate[:, None]
    return ffn.LayerNorm(hidden + ffn.dropout(out.view(b, n, d)))


def loop(ffn, hidden, real):
    b, n, d = hidden.shape
    flat = hidden.reshape(b * n, d)
    stats, gate = ffn.router(flat, real)
    rows = []
    for t in range(b * n):  # one token at a time (a host sync per token to read its expert)
        e = int(stats.expert[t])
        if e == ffn.num_experts:
            rows.append(flat.new_zeros(d))
            continue
        y = (
            ffn.act(flat[t] @ ffn.in_weight[e] + ffn.in_bias[e]) @ ffn.out_weight[e]
            + ffn.out_bias[e]
        )
        rows.append(y * gate[t])
    return ffn.LayerNorm(hidden + ffn.dropout(torch.stack(rows).view(b, n, d)))


def time_once(fn, ffn, hidden, real) -> float:
    ffn.zero_grad(set_to_none=True)
    start = time.perf_counter()
    fn(ffn, hidden, real).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-loop", action="store_true", help="skip the slow per-token loop")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = BertConfig(hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                       intermediate_size=args.ffn, hidden_dropout_prob=0.0)  # fmt: skip
    ffn = MiniMoEFeedForward(minimoe_config(dense, 1, args.experts))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hidden = torch.randn(args.batch, args.length, args.hidden, requires_grad=True)
    mask = torch.ones(args.batch, args.length, dtype=torch.bool)
    mask[:, int(0.8 * args.length) :] = False  # 20 % padding, as in packed-pair batches
    real = mask.reshape(-1)
    variants = {"grouped_mm": grouped_mm, "tiled": tiled, "host_sync": host_sync,
                "masked": masked}  # fmt: skip
    ffn.eval()
    reference = grouped_mm(ffn, hidden, real)
    for fn in variants.values():
        torch.testing.assert_close(fn(ffn, hidden, real), reference)
    ffn.train()
    tokens = args.batch * args.length
    print(f"MoE FFN forward+backward, {args.batch} x {args.length} tokens (20 % padding), "
          f"d={args.hidden}, I={args.ffn}, E={args.experts}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians (best) of {args.repeats} interleaved rounds")  # fmt: skip
    times = {name: [] for name in variants}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, fn in variants.items():
            times[name].append(time_once(fn, ffn, hidden, real))
    base = statistics.median(times["grouped_mm"][1:])
    for name, values in times.items():
        med, best = statistics.median(values[1:]), min(values[1:])
        print(f"{name:<11} {med * 1e3:8.1f} ms ({best * 1e3:7.1f})  {tokens / med:9,.0f} tokens/s  "
              f"{med / base:5.2f}x grouped_mm")  # fmt: skip
    if not args.no_loop:
        t_loop = time_once(loop, ffn, hidden, real)
        print(f"{'loop':<11} {t_loop * 1e3:8.1f} ms once  {t_loop / base:5.2f}x grouped_mm")


if __name__ == "__main__":
    main()
