"""The MiniMoE paper recipes (`experiment=minimoe_*`) compose in-process with the real configs."""

from __future__ import annotations

from pathlib import Path

import pytest

TEACHERS = {"bert-base": "google-bert/bert-base-uncased",
            "bert-large": "google-bert/bert-large-uncased"}  # fmt: skip


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmdistill.resources import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("distill", overrides=overrides, return_hydra_config=True)


def _resolved(cfg, output_dir: Path) -> dict:
    """Everything resolved, `${hydra:...}` from the composed hydra config."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


@pytest.mark.parametrize("layers", [3, 4, 6])
@pytest.mark.parametrize("teacher", sorted(TEACHERS))
def test_minimoe_recipe(teacher, layers, tmp_path, cache_dir):
    import lmdistill.resources

    name = f"minimoe_{teacher}_L{layers}"
    assert (Path(lmdistill.resources.CONF_DIR) / "experiment" / f"{name}.yaml").is_file()
    cfg = _resolved(_compose([f"experiment={name}"]), tmp_path)
    assert cfg["teacher"]["name_or_path"] == TEACHERS[teacher]
    assert cfg["teacher"]["layer"] is None and cfg["method"]["teacher_layer"] is None  # last
    assert (cfg["student"]["num_hidden_layers"], cfg["student"]["hidden_size"]) == (layers, 384)
    method = cfg["method"]
    assert method["_target_"] == "lmdistill.modules.MiniMoE"
    assert method["relation_heads"] == 32 and cfg["teacher"]["relation_heads"] == 32
    assert method["relation_site"] == "top_projection"
    moe = method["moe"]
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
    cfg = _resolved(_compose(["experiment=minimoe_bert-base_L3", "moe=2x4"]), tmp_path)
    moe = cfg["method"]["moe"]
    assert (moe["attention_experts"], moe["ffn_experts"]) == (2, 4)
    assert cfg["method"]["relation_heads"] == 32
