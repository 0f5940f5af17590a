"""Export of sub-networks: a dense BERT directory AutoModel loads without lmdistill, equal to the
super-net's sub-network; the lmdistill-export-subnet command, its listing and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ofa_nets import HIDDEN, LAYERS, tiny_bert_config
from transformers import AutoTokenizer

from lmdistill.export_subnet import main
from lmdistill.models.export import PROVENANCE_FILE
from lmdistill.models.ofa_export import dense_subnet, subnet_params, subnet_table
from lmdistill.models.ofa_model import ofa_from_config

LOAD_WITHOUT_LMDISTILL = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1]).eval()
data = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(**data["batch"])
assert "lmdistill" not in sys.modules, "lmdistill was imported"
assert type(model).__name__ == "BertModel", type(model).__name__
torch.testing.assert_close(out.last_hidden_state, data["hidden"], atol=1e-5, rtol=1e-5)
torch.testing.assert_close(out.pooler_output, data["pooled"], atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, minilm_dir) -> Path:
    """A run directory whose student/ is a trained-looking super-net with tokenizer and provenance."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        supernet = ofa_from_config(
            tiny_bert_config(len(tokenizer)), ofa_layers=LAYERS, ofa_hidden=HIDDEN
        )
    run = tmp_path_factory.mktemp("ofa-run")
    supernet.save_pretrained(run / "student")
    tokenizer.save_pretrained(run / "student")
    (run / "student" / PROVENANCE_FILE).write_text(json.dumps({"method": "ofa_minilm"}))
    return run


def test_export_round_trip_with_automodel(run_dir, tmp_path):
    from lmdistill.export_subnet import load_supernet

    main([str(run_dir), "2", "48"])
    out = run_dir / "subnets" / "L2-H48"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 48)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (3, 192)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["method"] == "ofa_minilm" and provenance["subnet"]["in_family"]
    assert provenance["subnet"]["params"] == subnet_params(
        load_supernet(run_dir / "student").config, 2, 48
    )

    supernet = load_supernet(run_dir / "student")
    supernet.set_subnet(2, 48)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = dict(tokenizer(["a short one", "a somewhat longer second sentence here"],
                           padding=True, return_tensors="pt"))  # fmt: skip
    with torch.no_grad():
        expected = supernet(**batch)
    data = tmp_path / "expected.pt"
    torch.save({"batch": batch, "hidden": expected.last_hidden_state,
                "pooled": expected.pooler_output}, data)  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_LMDISTILL, str(out), str(data)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_table_lists_every_subnet_with_exact_params(run_dir, capsys):
    from lmdistill.export_subnet import load_supernet

    supernet = load_supernet(run_dir / "student")
    table = subnet_table(supernet.config)
    assert [(r["num_hidden_layers"], r["hidden_size"]) for r in table] == [
        (lay, hid) for lay in LAYERS for hid in HIDDEN
    ]
    for row in table:
        dense = dense_subnet(supernet, row["num_hidden_layers"], row["hidden_size"])
        assert row["params"] == sum(p.numel() for p in dense.parameters())
    assert table[0]["gflops"] > table[1]["gflops"] > table[-1]["gflops"] > 0
    main([str(run_dir), "--list"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 9 and lines[1].startswith("L3-H64")


@pytest.mark.parametrize(
    "args, message",
    [
        (["4", "64"], "l=4 is impossible"),
        (["0", "64"], "l=0 is impossible"),
        (["3", "40"], "h=40 is impossible"),
        (["3", "128"], "h=128 is impossible"),
    ],
)
def test_impossible_subnet_is_a_one_line_error(run_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (run_dir / "subnets" / f"L{args[0]}-H{args[1]}").exists()


def test_missing_supernet_and_existing_output_are_one_line_errors(run_dir, tmp_path, capsys):
    for argv, message in (
        ([str(tmp_path), "2", "48"], "no super-net"),
        ([str(run_dir), "1", "32", "--out", str(tmp_path)], "already exists"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_cli_runs_as_a_module(run_dir, tmp_path):
    out = tmp_path / "cli-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lmdistill.export_subnet", str(run_dir), "5", "48", "--out", str(out)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        "lmdistill: error: sub-network layers l=5 is impossible for a 3-layer super-net; "
        "choose l in 1..3"
    ]
