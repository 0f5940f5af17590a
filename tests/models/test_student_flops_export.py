"""Student construction, analytic FLOPs, and export round trips."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel

from lmdistill.errors import UserError
from lmdistill.models import build_student, encoder_gflops, export_student
from lmdistill.models.student import copy_teacher_layers


@pytest.fixture
def teacher_config(tiny_teacher_dir):
    return AutoConfig.from_pretrained(tiny_teacher_dir)


def test_student_takes_teacher_vocabulary_and_its_own_shape(teacher_config):
    student = build_student(
        teacher_config,
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        intermediate_size=96,
    )
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        3,
        48,
        6,
        96,
    )
    assert c.vocab_size == teacher_config.vocab_size
    assert c.max_position_embeddings == teacher_config.max_position_embeddings
    assert (
        build_student(
            teacher_config, num_hidden_layers=1, hidden_size=40, num_attention_heads=4
        ).config.intermediate_size
        == 160
    )  # default 4d


def test_hidden_not_divisible_by_heads(teacher_config):
    with pytest.raises(UserError, match="hidden_size=50 is not divisible by .*heads=4"):
        build_student(teacher_config, num_hidden_layers=2, hidden_size=50, num_attention_heads=4)


def test_init_from_teacher_copies_uniform_layers(tiny_teacher_dir, teacher_config):
    teacher = AutoModel.from_pretrained(tiny_teacher_dir)
    student = build_student(
        teacher_config,
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
    )
    assert copy_teacher_layers(teacher, student) == [
        1
    ]  # the last student layer <- last teacher layer
    torch.testing.assert_close(
        student.encoder.layer[0].attention.self.query.weight,
        teacher.encoder.layer[1].attention.self.query.weight,
    )
    torch.testing.assert_close(
        student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight
    )
    with pytest.raises(UserError, match="widths differ"):
        copy_teacher_layers(
            teacher,
            build_student(
                teacher_config, num_hidden_layers=1, hidden_size=48, num_attention_heads=4
            ),
        )


@pytest.mark.parametrize(
    ("layers", "hidden", "ffn", "expected"),
    [(12, 768, 3072, 22.3), (24, 1024, 4096, 78.9), (3, 384, 1536, 1.43), (6, 384, 1536, 2.87)],
)
def test_gflops_match_the_papers(layers, hidden, ffn, expected):
    # docs/methods.md section 12: BERT-base 22.3 G, BERT-large 78.9 G, 3x384 1.43 G, 6x384 2.87 G
    assert encoder_gflops(layers, hidden, ffn, 128) == pytest.approx(expected, abs=0.06)


def test_export_loads_without_lmdistill_and_gives_the_same_outputs(
    tmp_path, tiny_teacher_dir, teacher_config, padded_batch
):
    student = build_student(
        teacher_config, num_hidden_layers=2, hidden_size=32, num_attention_heads=4
    ).eval()
    with torch.no_grad():
        expected = student(**padded_batch).last_hidden_state
    out = export_student(student, tiny_teacher_dir, tmp_path / "student", {"method": "test"})
    torch.save({k: v for k, v in padded_batch.items()}, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["lmdistill"] = None  # importing lmdistill now fails: the export must not need it
import torch
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained({str(out)!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
batch = torch.load({str(tmp_path / "batch.pt")!r})
with torch.no_grad():
    got = model(**batch).last_hidden_state
torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6, rtol=1e-5)
print("OK", type(model).__name__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK BertModel" in result.stdout
    assert json.loads((out / "lmdistill_provenance.json").read_text()) == {"method": "test"}
    assert (out / "model.safetensors").exists()


def test_export_never_overwrites(tmp_path, tiny_teacher_dir, teacher_config):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        export_student(
            build_student(
                teacher_config, num_hidden_layers=1, hidden_size=32, num_attention_heads=4
            ),
            tiny_teacher_dir,
            tmp_path / "student",
            {},
        )
    assert (tmp_path / "student" / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary leftovers


# --- teacher layers copied into students shallower and deeper than the teacher -----------------


def _expected_mapping(t: int, s: int) -> list[int]:
    """Independently: a shallower student picks the teacher layer nearest to (j + 1) * T / S
    (1-indexed, halves rounded up) so that the last layers meet; a deeper one splits its
    layers into T runs of consecutive layers, sizes differing by at most one, the shorter first."""
    from fractions import Fraction

    if s <= t:
        out = []
        for j in range(s):
            x = Fraction((j + 1) * t, s)
            lo = x.numerator // x.denominator
            nearest = lo + 1 if x - lo >= Fraction(1, 2) else lo  # halves round up
            out.append(nearest - 1)
        return out
    out = []
    for layer in range(
        t
    ):  # teacher layer `layer` covers student layers [ceil(l*S/T), ceil((l+1)*S/T))
        start, stop = -(-layer * s // t), -(-(layer + 1) * s // t)
        out += [layer] * (stop - start)
    return out


@pytest.mark.parametrize(
    ("t", "s", "expected"),
    [
        (6, 3, [1, 3, 5]),
        (12, 4, [2, 5, 8, 11]),
        (12, 8, [1, 2, 4, 5, 7, 8, 10, 11]),  # evenly spaced: steps 1, 2, 1, 2, ...
        (8, 3, [2, 4, 7]),
        (24, 6, [3, 7, 11, 15, 19, 23]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (2, 1, [1]),
        (6, 12, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
        (2, 3, [0, 0, 1]),
        (4, 6, [0, 0, 1, 2, 2, 3]),
        (1, 3, [0, 0, 0]),
    ],
)
def test_layer_mapping_in_both_directions(t, s, expected):
    from lmdistill.models.student import layer_mapping

    assert layer_mapping(t, s) == expected == _expected_mapping(t, s)


def test_layer_mapping_matches_the_independent_computation_everywhere():
    from lmdistill.models.student import layer_mapping

    for t in range(1, 25):
        for s in range(1, 25):
            mapping = layer_mapping(t, s)
            assert mapping == _expected_mapping(t, s), (t, s)
            assert mapping[-1] == t - 1 and all(0 <= m < t for m in mapping)
            assert mapping == sorted(mapping)  # never goes back down the teacher
            if s > t:  # every teacher layer is used, on consecutive student layers
                assert sorted(set(mapping)) == list(range(t)) and mapping[0] == 0


@pytest.mark.parametrize("layers", [1, 3, 4])  # shallower than, deeper than the 2-layer teacher
def test_init_from_teacher_copies_exactly_the_mapped_layers(
    layers, tiny_teacher_dir, teacher_config
):
    from lmdistill.models.student import layer_mapping

    teacher = AutoModel.from_pretrained(tiny_teacher_dir)
    shape = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    student = build_student(
        teacher_config, init_from_teacher=teacher, num_hidden_layers=layers, **shape
    )
    expected = {1: [1], 3: [0, 0, 1], 4: [0, 0, 1, 1]}[layers]
    assert layer_mapping(2, layers) == expected
    for j, t in enumerate(expected):
        got, want = student.encoder.layer[j].state_dict(), teacher.encoder.layer[t].state_dict()
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=f"{j} {name}")
    torch.testing.assert_close(student.embeddings.word_embeddings.weight,
                               teacher.embeddings.word_embeddings.weight, rtol=0, atol=0)  # fmt: skip


def test_init_from_teacher_embeddings_copies_the_embeddings_only(tiny_teacher_dir):
    from lmdistill.models.builders import encoder_student
    from lmdistill.models.teacher import build_teacher

    teacher = build_teacher(tiny_teacher_dir)
    # other heads and FFN width than the teacher's: fine, only the hidden size must match
    student = encoder_student(teacher, 1, 32, 2, 48, init_from_teacher="embeddings")
    got, want = student.embeddings.state_dict(), teacher.model.embeddings.state_dict()
    assert got.keys() == want.keys()
    for name in want:  # words, positions, token types, LayerNorm
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    query = student.encoder.layer[0].attention.self.query.weight  # [32, 32], BERT init
    for layer in teacher.model.encoder.layer:
        assert not torch.allclose(query, layer.attention.self.query.weight)
    assert abs(query.std().item() - teacher.config.initializer_range) < 0.01
    with pytest.raises(UserError, match="hidden sizes differ \\(teacher 32, student 16\\)"):
        encoder_student(teacher, 1, 16, 2, 32, init_from_teacher="embeddings")
    with pytest.raises(UserError, match="widths differ"):  # true copies layers: all widths
        encoder_student(teacher, 1, 32, 2, 48, init_from_teacher=True)
    with pytest.raises(UserError, match="init_from_teacher='layers' is not one of false, true, "):
        encoder_student(teacher, 1, 32, 2, 48, init_from_teacher="layers")


# --- exports readable by the colleagues the umask allows ---------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_export_and_tiny_teacher_directories_follow_the_umask(umask, tmp_path, tiny_teacher_dir,
                                                              teacher_config):  # fmt: skip
    import os
    import stat

    from lmdistill.models.tiny import ensure_tiny_teacher

    student = build_student(
        teacher_config, num_hidden_layers=1, hidden_size=32, num_attention_heads=4
    )
    old = os.umask(umask)
    try:
        out = export_student(student, tiny_teacher_dir, tmp_path / "run" / "student", {})
        tiny = ensure_tiny_teacher(tmp_path / "cache")
    finally:
        os.umask(old)
    for path in (out, tmp_path / "cache" / "tiny-bert-v2"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, (path, oct(path.stat().st_mode))
        for child in path.iterdir():  # files as open() makes them: 0666 & ~umask
            assert stat.S_IMODE(child.stat().st_mode) == 0o666 & ~umask, child
    assert tiny == str(tmp_path / "cache" / "tiny-bert-v2")
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask
