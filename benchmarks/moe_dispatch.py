"""MoE FFN forward + backward: grouped dispatch vs naive baselines.

    python benchmarks/moe_dispatch.py [--batch 32 --length 128 --hidden 384 --ffn 1536 --experts 4]

grouped: lmdistill's dispatch (sort by expert, one slice per expert, index_copy back);
masked:  every expert on every token, outputs multiplied by a one-hot mask (E x the compute);
loop:    a Python loop over tokens (the naive per-token dispatch), timed once.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig

from lmdistill.models.moe import minimoe_config
from lmdistill.models.moe_layers import MiniMoEFeedForward


def grouped(ffn, hidden, real):
    return ffn(hidden, real)[0]


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


def time_fn(fn, ffn, hidden, real, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        ffn.zero_grad(set_to_none=True)
        start = time.perf_counter()
        fn(ffn, hidden, real).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
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
    torch.testing.assert_close(grouped(ffn.eval(), hidden, real), masked(ffn, hidden, real))
    ffn.train()
    tokens = args.batch * args.length
    print(f"MoE FFN forward+backward, {args.batch} x {args.length} tokens, d={args.hidden}, "
          f"I={args.ffn}, E={args.experts}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    t_grouped = time_fn(grouped, ffn, hidden, real, args.repeats)
    t_masked = time_fn(masked, ffn, hidden, real, args.repeats)
    print(f"grouped dispatch      {t_grouped * 1e3:9.1f} ms  ({tokens / t_grouped:,.0f} tokens/s)")
    print(f"masked (all experts)  {t_masked * 1e3:9.1f} ms  ratio {t_masked / t_grouped:.2f}x")
    if not args.no_loop:
        t_loop = time_fn(loop, ffn, hidden, real, 1)
        print(f"per-token loop        {t_loop * 1e3:9.1f} ms  ratio {t_loop / t_grouped:.2f}x")


if __name__ == "__main__":
    main()
