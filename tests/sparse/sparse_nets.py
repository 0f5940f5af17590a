"""Tiny BERT (RoBERTa, XLM-R) models of the sparsification tests (a module of its own: test files import it by
name)."""

from __future__ import annotations

import torch

TINY = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, initializer_range=0.2,
)  # fmt: skip


def tiny_bert(mlm: bool = False, seed: int = 0, dtype=torch.float32, family: str = "bert"):
    """A random tiny BertModel (or BertForMaskedLM, decoder tied), eval mode, frozen; `family`
    "roberta" or "xlm-roberta": the same shape as RoBERTa / XLM-R (positions numbered from the
    padding id + 1, with the `batch` fixture's padding id 0; the MLM head `lm_head`)."""
    import transformers as tf

    names = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[family]
    extra = {} if family == "bert" else {"pad_token_id": 0}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = getattr(tf, f"{names}Config")(**TINY, **extra)
        cls = getattr(tf, f"{names}ForMaskedLM" if mlm else f"{names}Model")
        model = cls._from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval().requires_grad_(False)


def random_orders(seed: int = 0):
    """Random head [2, 4], neuron [2, 64] and hidden [32] permutations."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.stack([torch.randperm(4, generator=g) for _ in range(2)])
    neurons = torch.stack([torch.randperm(64, generator=g) for _ in range(2)])
    return heads, neurons, torch.randperm(32, generator=g)
