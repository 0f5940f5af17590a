"""Analytic inference FLOPs of a BERT-family encoder."""

from __future__ import annotations


def encoder_gflops(
    num_hidden_layers: int, hidden_size: int, intermediate_size: int, seq_len: int = 128
) -> float:
    """GFLOPs (2 per multiply-add) of one sequence through the encoder's layers.

    Per layer: Q/K/V/O projections 4 d^2 and FFN 2 d I per token, plus attention scores and
    context 2 L d per token. Embeddings, LayerNorm, softmax and the pooler are negligible and not
    counted (the convention of the MiniLM and MiniMoE papers: BERT-base at 128 tokens = 22.3 G).
    """
    d, i, n = hidden_size, intermediate_size, seq_len
    per_token = 4 * d * d + 2 * d * i + 2 * n * d
    return 2.0 * n * per_token * num_hidden_layers / 1e9
