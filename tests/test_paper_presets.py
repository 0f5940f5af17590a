"""The paper presets (`experiment=...`) against the published recipes, composition only.

The numbers below are copied from the reference account of the methods (the shared METHODS.md:
section 10 "Training recipe of the original work", section 2's teacher-layer and relation-head
presets, section 5's published MiniMoE setting, section 7's OFA family, section 9's sequence
length), not from conf/: a preset that drifts from the paper fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import compose_distill, resolved_config

from lmdistill.config_checks import check_config

# section 10: AdamW betas (0.9, 0.999), eps 1e-6, lr 3e-4, wd 0.01, 1% warmup, clip 5.0,
# batch 128 per device x 8 devices (global 1024), fp16, seed 776, R = 32
ORIGINAL = dict(lr=3e-4, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.01, warmup_ratio=0.01,
                warmup_steps=None, clip=5.0, per_device=128, devices=8, global_batch=1024,
                precision="16-mixed", seed=776, relation_heads=32)  # fmt: skip
# section 10: MiniLM v2 paper: global batch 512, lr 6e-4, 400k steps, 4k warmup, beta2 0.98;
# section 2: layer 21 of 24 for BERT-large, 64 relation heads for large teachers
MINILM_V2_LARGE = dict(ORIGINAL, lr=6e-4, betas=[0.9, 0.98], warmup_steps=4000, max_steps=400000,
                       global_batch=512, relation_heads=64, teacher_layer=21)  # fmt: skip

BASE, LARGE = "google-bert/bert-base-uncased", "google-bert/bert-large-uncased"
MINILM_V2, MINIMOE = "lmdistill.methods.MiniLMv2", "lmdistill.methods.MiniMoE"
OFA = "lmdistill.methods.ofa_minilm.OFAMiniLM"

# preset: (teacher, method, (layers, hidden, heads, FFN), (attention, FFN experts), recipe)
PRESETS = {
    "minilm_v2_bert-base_L3": (BASE, MINILM_V2, (3, 384, 12, 1536), (1, 1), ORIGINAL),
    "minilm_v2_bert-large_L6": (LARGE, MINILM_V2, (6, 384, 12, 1536), (1, 1), MINILM_V2_LARGE),
    # section 5: published setting 1,4 on 3/4/6 x 384 students
    **{f"minimoe_bert-{size}_L{n}": (teacher, MINIMOE, (n, 384, 12, 1536), (1, 4), ORIGINAL)
       for size, teacher in (("base", BASE), ("large", LARGE)) for n in (3, 4, 6)},
    # section 7: 6 x 768 super-net with 64-dim heads, FFN 4h
    "ofa_minilm_bert-base_L6-H768": (BASE, OFA, (6, 768, 12, 3072), (1, 1), ORIGINAL),
}  # fmt: skip


def test_every_preset_is_pinned():
    from lmdistill.resources import CONF_DIR

    assert sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_the_paper(name, tmp_path, cache_dir, monkeypatch):
    import torch

    teacher, method, shape, experts, recipe = PRESETS[name]
    composed = compose_distill([f"experiment={name}"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # 16-mixed: the paper's GPUs
    check_config(composed)  # the checks accept it as shipped
    cfg = resolved_config(composed, tmp_path)
    assert cfg["teacher"]["name_or_path"] == teacher
    assert cfg["teacher"]["layer"] == recipe.get("teacher_layer")  # None: the last layer
    assert cfg["method"]["_target_"] == method
    assert cfg["method"]["relation_heads"] == recipe["relation_heads"]
    student = cfg["student"]
    assert (student["num_hidden_layers"], student["hidden_size"], student["num_attention_heads"],
            student["intermediate_size"]) == shape  # fmt: skip
    moe = cfg["moe"]
    assert (moe["attention_experts"], moe["ffn_experts"]) == experts
    if method == MINIMOE:  # section 5: LB weight 0.01, top projection as the original code
        assert moe["balance_weight"] == 0.01 and moe["router_noise"] == 0.1
        assert cfg["method"]["relation_site"] == "top_projection"

    optim = cfg["optim"]
    assert optim["lr"] == recipe["lr"] and optim["betas"] == recipe["betas"]
    assert optim["eps"] == recipe["eps"] and optim["weight_decay"] == recipe["weight_decay"]
    assert optim["warmup_steps"] == recipe["warmup_steps"]
    if recipe["warmup_steps"] is None:
        assert optim["warmup_ratio"] == recipe["warmup_ratio"]
    if "max_steps" in recipe:
        assert cfg["trainer"]["max_steps"] == recipe["max_steps"]

    trainer, data = cfg["trainer"], cfg["data"]
    assert trainer["gradient_clip_val"] == recipe["clip"] and cfg["seed"] == recipe["seed"]
    assert trainer["precision"] == recipe["precision"]
    assert trainer["devices"] == recipe["devices"]
    global_batch = (data["batch_size"] * trainer["devices"] * trainer["num_nodes"]
                    * trainer["accumulate_grad_batches"])  # fmt: skip
    assert global_batch == recipe["global_batch"]
    if recipe is ORIGINAL:
        assert data["batch_size"] == recipe["per_device"]
    # section 9: max_len 128 on English Wikipedia
    assert data["max_seq_length"] == 128 and data["hf_path"] == "wikimedia/wikipedia"
    # several devices run as DDP ranks of this job (the default trainer is one device)
    assert trainer["strategy"]["_target_"] == "lmdistill.distributed.HydraDDPStrategy"
    assert trainer["strategy"]["find_unused_parameters"] is False


def test_ofa_preset_family(tmp_path, cache_dir):
    """Section 7: sub-networks {6,4,3} layers x {768,512,384,256,192} hidden."""
    cfg = resolved_config(compose_distill(["experiment=ofa_minilm_bert-base_L6-H768"]), tmp_path)
    assert cfg["ofa"]["layers"] == [6, 4, 3]
    assert cfg["ofa"]["hidden"] == [768, 512, 384, 256, 192]
    assert cfg["ofa"]["sampling"] == "sandwich"  # section 7: our default; `all` is the original's
    head = cfg["student"]["hidden_size"] // cfg["student"]["num_attention_heads"]
    assert head == 64 and all(h % head == 0 for h in cfg["ofa"]["hidden"])
    assert all(h % cfg["method"]["relation_heads"] == 0 for h in cfg["ofa"]["hidden"])


# --- what the README and docs/methods.md say about the presets ------------------------------------

ROOT = Path(__file__).parents[1]


def _options(group: str) -> list[str]:
    from lmdistill.resources import CONF_DIR

    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _override_row(key: str) -> str:
    """The README's row of `key=` in its table of overrides."""
    rows = [
        r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith(f"| `{key}=` |")
    ]
    assert len(rows) == 1, key
    return rows[0]


GROUPS = ("teacher", "student", "method", "moe", "assistant", "data", "experiment", "trainer")


@pytest.mark.parametrize("group", GROUPS)
def test_readme_override_table_lists_every_option(group):
    row = _override_row(group)
    assert [o for o in _options(group) if f"`{o}`" not in row] == []


def test_readme_names_each_methods_default_relation_site():
    # METHODS.md section 1: last_layer for dense MiniLM, top_projection for MoE, sparse and OFA
    row = _override_row("student.relation_site")
    assert "`top_projection` for `minimoe`, `sparse_minilm` and `ofa_minilm`" in row
    assert "`last_layer` for `minilm_v1` and `minilm_v2`" in row


def test_methods_doc_states_the_recipe_the_presets_cite():
    """The presets' comments cite docs/methods.md section 10 for these values."""
    recipe = (ROOT / "docs" / "methods.md").read_text().split("### The recipe")[1]
    text = " ".join(recipe.split("## 11.")[0].split())
    phrases = ("128 per device x 8 devices (global 1024)", "fp16", "5 epochs", "batch 512",
               "lr 6e-4", "400k steps", "4k warmup", "beta2 0.98", "layer 21 of 24", "R = 64",
               "trainer=ddp")  # fmt: skip
    assert [p for p in phrases if p not in text] == []
