"""The MiniMoE paper recipes (`experiment=minimoe_*`) compose in-process with the real configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import compose_distill, resolved_config

TEACHERS = {"bert-base": "google-bert/bert-base-uncased",
            "bert-large": "google-bert/bert-large-uncased"}  # fmt: skip


@pytest.mark.parametrize("layers", [3, 4, 6])
@pytest.mark.parametrize("teacher", sorted(TEACHERS))
def test_minimoe_recipe(teacher, layers, tmp_path, cache_dir):
    import lmdistill.resources

    name = f"minimoe_{teacher}_L{layers}"
    assert (Path(lmdistill.resources.CONF_DIR) / "experiment" / f"{name}.yaml").is_file()
    cfg = resolved_config(compose_distill([f"experiment={name}"]), tmp_path)
    assert cfg["teacher"]["name_or_path"] == TEACHERS[teacher]
    assert cfg["teacher"]["layer"] is None and "teacher_layer" not in cfg["method"]  # last
    assert (cfg["student"]["num_hidden_layers"], cfg["student"]["hidden_size"]) == (layers, 384)
    method = cfg["method"]
    assert method["_target_"] == "lmdistill.methods.MiniMoE"
    assert method["relation_heads"] == 32 and cfg["teacher"]["relation_heads"] == 32
    assert method["relation_site"] == "top_projection" == cfg["student"]["relation_site"]
    moe = cfg["student"]["moe"]
    assert (moe["attention_experts"], moe["ffn_experts"]) == (1, 4) and moe == cfg["moe"]
    assert moe["balance_weight"] == 0.01
    assert cfg["optim"]["lr"] == 3e-4 and cfg["optim"]["eps"] == 1e-6
    assert cfg["optim"]["weight_decay"] == 0.01 and cfg["optim"]["warmup_ratio"] == 0.01
    assert cfg["optim"]["warmup_steps"] is None
    assert cfg["trainer"]["gradient_clip_val"] == 5.0 and cfg["seed"] == 776
    assert cfg["trainer"]["precision"] == "16-mixed"
    assert cfg["data"]["hf_path"] == "wikimedia/wikipedia"
    assert cfg["data"]["batch_size"] == 128 and cfg["trainer"]["devices"] == 8  # global 1024


def test_moe_override_wins_over_the_recipe(tmp_path, cache_dir):
    """A sweep `experiment=minimoe_... moe=1x1,1x4,2x4` really changes the experts."""
    cfg = resolved_config(compose_distill(["experiment=minimoe_bert-base_L3", "moe=2x4"]), tmp_path)
    moe = cfg["student"]["moe"]
    assert (moe["attention_experts"], moe["ffn_experts"]) == (2, 4)
    assert cfg["method"]["relation_heads"] == 32
