"""Carve a sub-network out of a super-net as a plain dense `BertModel`, export it, list them all.

Every weight of sub-network (l, h) is the leading block of the same-named super-net weight
(`OFABertModel` keeps BERT's names): Q/K/V/O [h, h], FFN [I', h] and [h, I'], embedding tables
[rows, h], LayerNorms [h], pooler [h, h], for the first l layers. The result is an ordinary
`BertModel` (model type "bert") that `AutoModel` loads without lmdistill.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertModel

from lmdistill.models.export import export_student
from lmdistill.models.flops import encoder_gflops
from lmdistill.models.ofa_config import OFABertConfig, dense_config, subnet_shape
from lmdistill.models.ofa_model import OFABertModel


@torch.no_grad()
def dense_subnet(supernet: OFABertModel, layers: int, hidden: int) -> BertModel:
    """Sub-network (layers, hidden) as a `BertModel` with copies of its weights (eval mode)."""
    config = dense_config(supernet.config, layers, hidden)
    dense = BertModel._from_config(
        config, attn_implementation="sdpa", add_pooling_layer=supernet.pooler is not None
    )
    source = supernet.state_dict()
    state = {
        key: source[key][tuple(slice(0, n) for n in value.shape)].clone().to(value.dtype)
        for key, value in dense.state_dict().items()
    }  # leading blocks; dense keys are the first l layers' keys of the super-net
    dense.load_state_dict(state)
    return dense.to(next(supernet.parameters()).device).eval()


def subnet_params(config: OFABertConfig, layers: int, hidden: int, pooler: bool = True) -> int:
    """Parameters of the dense `BertModel` of sub-network (layers, hidden), counted analytically."""
    s = subnet_shape(config, layers, hidden)
    h, i = s.hidden, s.intermediate
    rows = config.vocab_size + config.max_position_embeddings + config.type_vocab_size
    per_layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return rows * h + 2 * h + s.layers * per_layer + (h * h + h if pooler else 0)


def subnet_gflops(config: OFABertConfig, layers: int, hidden: int, seq_len: int = 128) -> float:
    """Inference GFLOPs of one sequence through sub-network (layers, hidden) (`encoder_gflops`)."""
    s = subnet_shape(config, layers, hidden)
    return encoder_gflops(s.layers, s.hidden, s.intermediate, seq_len)


def subnet_table(config: OFABertConfig, seq_len: int = 128) -> list[dict]:
    """Every sub-network of the trained family, largest first: shape, parameters, GFLOPs (for
    summary.json and `lmdistill-export-subnet --list`)."""
    rows = []
    for lay, hid in config.family():
        s = subnet_shape(config, lay, hid)
        rows.append(
            {
                "name": subnet_name(lay, hid),
                "num_hidden_layers": s.layers,
                "hidden_size": s.hidden,
                "num_attention_heads": s.heads,
                "intermediate_size": s.intermediate,
                "params": subnet_params(config, lay, hid),
                "gflops": subnet_gflops(config, lay, hid, seq_len),
            }
        )
    return rows


def subnet_name(layers: int, hidden: int) -> str:
    """Directory name of an exported sub-network: L<l>-H<h> (as the student configs)."""
    return f"L{layers}-H{hidden}"


def export_subnet(
    supernet: OFABertModel,
    layers: int,
    hidden: int,
    tokenizer: str,
    out_dir: str | Path,
    provenance: dict | None = None,
) -> Path:
    """Write sub-network (layers, hidden) to `out_dir` as a dense BERT directory, atomically
    (`export_student`: weights, config, tokenizer, provenance; never over an existing directory).

    The provenance is `provenance` plus a `subnet` entry: the shape, parameters, GFLOPs and
    whether the sub-network belongs to the trained family.
    """
    dense = dense_subnet(supernet, layers, hidden)
    s = supernet.config
    record = dict(provenance or {})
    record["subnet"] = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": dense.config.num_attention_heads,
        "intermediate_size": dense.config.intermediate_size,
        "params": sum(p.numel() for p in dense.parameters()),
        "gflops": subnet_gflops(s, layers, hidden),
        "in_family": (layers, hidden) in s.family(),
        "supernet": {
            "num_hidden_layers": s.num_hidden_layers,
            "hidden_size": s.hidden_size,
            "ofa_layers": list(s.ofa_layers),
            "ofa_hidden": list(s.ofa_hidden),
        },
    }
    return export_student(dense, tokenizer, out_dir, record)
