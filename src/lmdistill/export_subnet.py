"""lmdistill-export-subnet: export one sub-network of a once-for-all super-net as a dense BERT.

    lmdistill-export-subnet RUN_DIR 3 384            # -> RUN_DIR/subnets/L3-H384
    lmdistill-export-subnet SUPERNET_DIR 4 256 --out my-L4-H256
    lmdistill-export-subnet RUN_DIR --list           # every sub-network: parameters, GFLOPs

RUN_DIR is the output directory of a `method=ofa_minilm` run (its super-net is RUN_DIR/student);
SUPERNET_DIR is a saved super-net (model type lmdistill-ofa) or any BERT directory (its full
size is the super-net). The export is an ordinary BERT directory (weights, config, tokenizer,
lmdistill_provenance.json) that `transformers.AutoModel` loads without lmdistill, whose outputs
equal the super-net's for that sub-network. Sub-networks outside the trained family
(`ofa_layers` x `ofa_hidden`) are exported too, with a note: they were not trained for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmdistill.errors import UserError, report_user_errors
from lmdistill.models.export import PROVENANCE_FILE
from lmdistill.models.ofa_config import OFABertConfig, subnet_shape
from lmdistill.models.ofa_export import export_subnet, subnet_name, subnet_table
from lmdistill.models.ofa_model import OFABertModel
from lmdistill.models.teacher import quiet_transformers

SUPERNET_TYPES = ("lmdistill-ofa", "bert")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def find_supernet(path: str | Path) -> Path:
    """The super-net directory of a run directory (RUN_DIR/student) or the directory itself."""
    path = Path(path)
    for candidate in (path, path / "student"):
        config = candidate / "config.json"
        if config.is_file():
            model_type = json.loads(config.read_text()).get("model_type")
            if model_type not in SUPERNET_TYPES:
                raise UserError(
                    f"{candidate} holds a {model_type!r} model, not a once-for-all super-net; "
                    "pass the run directory of a method=ofa_minilm run or a BERT directory"
                )
            return candidate
    raise UserError(
        f"no super-net in {path} (no config.json, no student/config.json); pass the run "
        "directory of a method=ofa_minilm run or a saved super-net directory"
    )


def load_supernet(path: Path) -> OFABertModel:
    """The super-net saved in `path`, in float32 and eval mode; a `UserError` if weights are missing."""
    with quiet_transformers():
        config = OFABertConfig.from_pretrained(path)
        model, info = OFABertModel.from_pretrained(
            path, config=config, attn_implementation="sdpa", output_loading_info=True
        )
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    if missing:
        raise UserError(
            f"the super-net in {path} lacks weights for {missing[:3]}; export from a complete "
            "super-net directory (re-run the export of the run)"
        )
    if info["missing_keys"]:
        model.pooler = None  # saved without a pooler: export without one
    return model.float().eval()


def default_out(run_or_supernet: Path, supernet: Path, layers: int, hidden: int) -> Path:
    """RUN_DIR/subnets/L<l>-H<h> (for a super-net directory: subnets/ beside it)."""
    base = run_or_supernet if supernet != run_or_supernet else supernet.parent
    return base / "subnets" / subnet_name(layers, hidden)


def print_table(config: OFABertConfig) -> None:
    print(f"{'sub-network':<12} {'heads':>5} {'FFN':>6} {'params':>10} {'GFLOPs':>8}")
    for row in subnet_table(config):
        print(
            f"{row['name']:<12} {row['num_attention_heads']:>5} {row['intermediate_size']:>6} "
            f"{row['params'] / 1e6:>9.2f}M {row['gflops']:>8.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lmdistill-export-subnet",
        description="Export sub-network (l, h) of a once-for-all super-net as a dense BERT.",
    )
    parser.add_argument("path", help="run directory of method=ofa_minilm, or a super-net directory")
    parser.add_argument("layers", type=int, nargs="?", help="l: the first l layers")
    parser.add_argument("hidden", type=int, nargs="?", help="h: the leading h hidden dims")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/subnets/L<l>-H<h>)")
    parser.add_argument("--list", action="store_true", help="list the trained sub-networks")
    args = parser.parse_args(argv)
    if not args.list and (args.layers is None or args.hidden is None):
        parser.error("give the sub-network as two integers, l and h (or --list)")
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = Path(args.path)
    supernet_dir = find_supernet(path)
    if args.list:
        with quiet_transformers():
            print_table(OFABertConfig.from_pretrained(supernet_dir))
        return
    with quiet_transformers():
        config = OFABertConfig.from_pretrained(supernet_dir)
    subnet_shape(config, args.layers, args.hidden)  # a one-line error before loading weights
    out = Path(args.out) if args.out else default_out(path, supernet_dir, args.layers, args.hidden)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    if not any((supernet_dir / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{supernet_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the teacher's "
            "tokenizer into it (AutoTokenizer.save_pretrained)"
        )
    supernet = load_supernet(supernet_dir)
    provenance_file = supernet_dir / PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    provenance["supernet_dir"] = str(supernet_dir.resolve())
    with quiet_transformers():
        export_subnet(
            supernet, args.layers, args.hidden, str(supernet_dir), out, provenance=provenance
        )
    if (args.layers, args.hidden) not in config.family():
        print(
            f"note: L{args.layers}-H{args.hidden} is not in the trained family "
            f"{config.ofa_layers} x {config.ofa_hidden}; it was not trained for",
            file=sys.stderr,
        )
    print(out)


if __name__ == "__main__":
    main()
