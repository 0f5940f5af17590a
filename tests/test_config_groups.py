"""Config groups own their keys: teacher layer and relation site are honoured by every method,
`moe` composes with any method (and a dense method refuses experts), `assistant` is a group,
and the MiniMoE experiments share one recipe. Built in-process from the real configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import compose_distill, resolved_config
from omegaconf import OmegaConf

from lmdistill.errors import UserError

TINY = ["teacher=tiny", "student=tiny"]


def _method(overrides: list[str], tmp_path: Path):
    """The method as `lmdistill-distill` builds it from these overrides (tiny models)."""
    from lmdistill.pipeline import build_method

    cfg = OmegaConf.create(resolved_config(compose_distill([*TINY, *overrides]), tmp_path))
    return build_method(cfg, "32")


@pytest.mark.parametrize("method", ["minilm_v1", "minilm_v2", "minimoe"])
def test_teacher_layer_is_honoured_by_every_method(method, tmp_path, cache_dir):
    module = _method([f"method={method}", "teacher.layer=1"], tmp_path)
    assert module.teacher.layer == 1 and len(module.teacher.model.encoder.layer) == 1


@pytest.mark.parametrize(("teacher", "preset"), [("bert-large-uncased", 21),
                                                 ("roberta-large", 19), ("bert-base-uncased", None)])  # fmt: skip
@pytest.mark.parametrize(
    "method", ["minilm_v1", "minilm_v2", "minimoe", "tinybert", "ofa_minilm", "sparse_minilm"]
)
def test_the_minilm_v2_layer_preset_is_minilm_v2s_alone(method, teacher, preset, tmp_path):
    """The papers: MiniLM v2 distils layer 21 of BERT-large (19 of RoBERTa-large); MiniLM v1,
    TinyBERT and the rest distil the last layer (None) unless teacher.layer says otherwise."""
    overrides = [f"method={method}", f"teacher={teacher}"]
    cfg = resolved_config(compose_distill(overrides), tmp_path)
    assert cfg["teacher"]["layer"] == (preset if method == "minilm_v2" else None)
    cfg = resolved_config(compose_distill([*overrides, "teacher.layer=12"]), tmp_path)
    assert cfg["teacher"]["layer"] == 12


@pytest.mark.parametrize("method", ["minilm_v1", "minilm_v2", "minimoe"])
@pytest.mark.parametrize("site", ["last_layer", "top_projection"])
def test_relation_site_is_honoured_by_every_method(method, site, tmp_path, cache_dir):
    module = _method([f"method={method}", f"student.relation_site={site}"], tmp_path)
    assert module.relation_site == site and module.summary_fields()["relation_site"] == site
    assert (module.relation_projection is not None) == (site == "top_projection")


@pytest.mark.parametrize(("method", "site"), [("minilm_v2", "last_layer"),
                                              ("minimoe", "top_projection")])  # fmt: skip
def test_relation_site_defaults_to_the_methods_own(method, site, tmp_path, cache_dir):
    assert _method([f"method={method}"], tmp_path).relation_site == site


@pytest.mark.parametrize("method", ["minilm_v1", "minilm_v2"])
def test_a_dense_method_refuses_experts_in_one_line(method, tmp_path, cache_dir):
    with pytest.raises(UserError) as info:
        _method([f"method={method}", "moe=1x4"], tmp_path)
    assert "moe=1x4" in str(info.value) and "method=minimoe" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("method", "moe", "experts"), [
    ("minilm_v2", "1x1", (1, 1)), ("minimoe", "1x1", (1, 1)), ("minimoe", "1x4", (1, 4)),
    ("minimoe", "2x4", (2, 4)),
])  # fmt: skip
def test_moe_composes_with_methods(method, moe, experts, tmp_path, cache_dir):
    from lmdistill.models.describe import experts_of

    module = _method([f"method={method}", f"moe={moe}"], tmp_path)
    assert experts_of(module.student) == experts


def test_assistant_is_a_group_null_by_default(tmp_path, cache_dir):
    assert compose_distill([]).get("assistant") is None
    for method in ("minilm_v1", "minilm_v2", "minimoe"):
        cfg = resolved_config(compose_distill([f"method={method}", "assistant=default"]), tmp_path)
        assert cfg["assistant"]["hidden_size"] == cfg["student"]["hidden_size"]
        assert cfg["assistant"]["method"] is None
    cfg = compose_distill(["method=minimoe", "assistant=dense_v2"])
    assert cfg.assistant.method == "minilm_v2"


def test_assistant_method_minimoe_trains_a_dense_assistant(tmp_path, cache_dir):
    """assistant.method=minimoe takes minimoe's config without its defaults list (moe=1x4): the
    assistant stays dense (moe=1x1)."""
    from lmdistill.assistant import assistant_stage
    from lmdistill.models.describe import experts_of
    from lmdistill.pipeline import build_method

    cfg = compose_distill([*TINY, "assistant=default", "assistant.method=minimoe"])
    stage = OmegaConf.create(resolved_config(assistant_stage(cfg), tmp_path))
    assert "defaults" not in stage.method and stage.moe.ffn_experts == 1
    module = build_method(stage, "32")
    assert type(module).__name__ == "MiniMoE" and experts_of(module.student) == (1, 1)


def test_minimoe_experiments_share_one_recipe(tmp_path, cache_dir):
    from lmdistill.resources import CONF_DIR

    names = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("minimoe_*.yaml"))
    assert len(names) == 6
    configs = [resolved_config(compose_distill([f"experiment={n}"]), tmp_path) for n in names]
    for cfg in configs:  # the teacher's tokenizer and the shapes differ, nothing else
        for key in ("teacher", "student"):
            del cfg[key]
        del cfg["data"]["tokenizer"]
    assert all(cfg == configs[0] for cfg in configs)
    for name in names:
        text = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
        assert "/recipe/minimoe_paper" in text and "optim:" not in text
