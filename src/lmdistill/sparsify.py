"""lmdistill-sparsify: importance of every head, FFN neuron and hidden dim; a reordered teacher.

    lmdistill-sparsify teacher=minilm-l6-local                 # scores + reordered model
    lmdistill-sparsify teacher=bert-base-uncased sparsity=s90  # ... + the sliced s90 student

Loads the model (with its MLM head when it has one), accumulates first-order Taylor importance
over `num_batches` batches of the corpus (`lmdistill.sparse.importance`; checkpointed every
`checkpoint_every` batches, resumed from the output directory), reorders the model most
important first (`lmdistill.sparse.reorder`) and writes, into the output directory:

    importance.safetensors   head [layers, A], neuron [layers, I], hidden [d] (mean |grad|),
                             head_normalized, neuron_normalized (per-layer L2), *_order
    reordered/               the reordered model (same architecture, a Hugging Face directory)
    sparse-s<NN>/            with sparsity=s<NN>: the sliced student (model type lmdistill-sparse)
    summary.json             the run, and the shape, parameters and GFLOPs of every supported
                             sparsity (`lmdistill.sparse.schedule.SUPPORTED`)
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save
from transformers import AutoModel, AutoModelForMaskedLM, PreTrainedModel

from lmdistill import __version__
from lmdistill.data.datamodule import load_tokenizer
from lmdistill.distributed import job_scope
from lmdistill.errors import UserError, report_user_errors
from lmdistill.hydra_errors import report_hydra_errors
from lmdistill.io import open_atomic, write_json_atomic
from lmdistill.models.export import export_student
from lmdistill.models.sparse import sparse_gflops, sparse_params
from lmdistill.models.teacher import _load_config, quiet_transformers
from lmdistill.resources import CONF_DIR, register_resolvers
from lmdistill.runs import remember_job, write_job_record
from lmdistill.sparse.cache import REORDERED_DIR, SCORES_FILE, publish, sparsify_key
from lmdistill.sparse.importance import (
    LOSSES,
    ImportanceSums,
    MLMSpec,
    accumulate,
    importance_order,
    normalize,
)
from lmdistill.sparse.reorder import reorder_model
from lmdistill.sparse.schedule import SUPPORTED, SparsityPlan, plan_sparsity
from lmdistill.sparse.slicing import slice_model, sparse_config

log = logging.getLogger("lmdistill")
register_resolvers()
# Deprecation notice raised inside torchdata itself; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")

PARTIAL_FILE = "importance.partial.pt"


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r} must be a positive integer; e.g. {key}=8")
    return value


def check_config(cfg: DictConfig) -> None:
    """Bad values as one line, before anything is loaded or written."""
    for key in ("num_batches", "checkpoint_every", "log_every"):
        _positive_int(cfg, key)
    if cfg.loss not in ("auto", *LOSSES):
        raise UserError(f"unknown loss {cfg.loss!r}; use auto, {', '.join(LOSSES)}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed!r} must be an integer; e.g. seed=776")
    if cfg.data.get("val_batches"):
        raise UserError(
            f"data.val_batches={cfg.data.val_batches}: lmdistill-sparsify does not validate (the "
            "importance reads the whole corpus); remove data.val_batches"
        )
    if cfg.get("sparsity") is not None:
        from lmdistill.sparse.schedule import prune_percent

        prune_percent(cfg.sparsity.target)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as err:
        raise UserError(f"unknown device {setting!r}; use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={setting} but no CUDA GPU is visible; use device=auto or cpu")
    return device


def has_mlm_head(config) -> bool:
    """Whether the checkpoint was saved with an MLM head (its recorded architecture)."""
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in config.architectures or [])


def load_model(name_or_path: str, loss: str, revision=None, trust_remote_code=False):
    """(model in eval mode with frozen float32 weights, the loss it is scored with)."""
    config = _load_config(name_or_path, revision, trust_remote_code)
    if config.model_type == "lmdistill-sparse":
        raise UserError(
            f"{name_or_path} is already a sliced sparse model; sparsify the unpruned teacher "
            "(or its reordered/ directory)"
        )
    mlm = has_mlm_head(config)
    if loss == "mlm" and not mlm:
        raise UserError(
            f"{name_or_path} has no MLM head (architectures {config.architectures}); "
            "use loss=relation (or loss=auto)"
        )
    loss = ("mlm" if mlm else "relation") if loss == "auto" else loss
    auto = AutoModelForMaskedLM if loss == "mlm" else AutoModel
    with quiet_transformers():
        model, info = auto.from_pretrained(
            str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists()
            else name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
            dtype=torch.float32,
            output_loading_info=True,
        )  # fmt: skip
    if loss == "mlm" and (model.get_output_embeddings() is None or info["missing_keys"]):
        raise UserError(
            f"the MLM head of {name_or_path} is missing or incomplete (missing "
            f"{info['missing_keys'][:2]}); use loss=relation"
        )
    return model.eval().requires_grad_(False), loss


def fingerprint(cfg: DictConfig, loss: str) -> str:
    """What the scores depend on (`sparse.cache.sparsify_key`): a resumed run must match it, and
    it names the run's entry in the cache of sparsified teachers."""
    return sparsify_key(
        cfg.teacher.name_or_path, cfg.teacher.get("revision"),
        OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, cfg.num_batches, loss,
        cfg.relation_heads,
    )  # fmt: skip


def save_partial(path: Path, key: str, sums: ImportanceSums, loader) -> None:
    with open_atomic(path, "wb") as f:
        torch.save(
            {"fingerprint": key, "sums": sums.state_dict(), "loader": loader.state_dict()}, f
        )


def load_partial(path: Path, key: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means an unreadable partial state
        raise UserError(
            f"cannot read {path} ({type(err).__name__}); delete it to start the importance over"
        ) from err
    if state.get("fingerprint") != key:
        raise UserError(
            f"{path} was written by a run with another teacher, data, seed, num_batches or loss; "
            "run in a fresh output directory (or with the earlier settings)"
        )
    return state


def score(cfg: DictConfig, model, loss: str, out_dir: Path, device: torch.device) -> ImportanceSums:
    """Accumulate importance over `cfg.num_batches` batches, checkpointing the partial sums."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")  # bad paths or an empty corpus: one line before any work
    mlm = None
    if loss == "mlm":
        mlm = MLMSpec.from_tokenizer(load_tokenizer(cfg.data.tokenizer), model.config.vocab_size)
    elif model.config.hidden_size % cfg.relation_heads:
        raise UserError(
            f"relation_heads={cfg.relation_heads} does not divide the hidden size "
            f"{model.config.hidden_size}; set relation_heads to a divisor of it"
        )
    loader = datamodule.train_dataloader()
    key = fingerprint(cfg, loss)
    partial = out_dir / PARTIAL_FILE
    sums = ImportanceSums.zeros(model.config)
    if partial.exists():
        if not cfg.resume:
            raise UserError(f"{partial} exists and resume=false; run in a fresh output directory")
        state = load_partial(partial, key)
        sums = ImportanceSums.from_state_dict(state["sums"])
        loader.load_state_dict(state["loader"])
        log.info("resuming the importance from %s after %d batches", partial, sums.batches)
    total, start = cfg.num_batches, time.perf_counter()
    done_at_start = sums.batches
    while sums.batches < total:
        before = sums.batches
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            value = accumulate(model, batch, sums, loss, cfg.seed, cfg.relation_heads, mlm)
            loader.mark_batch_consumed()
            n = sums.batches
            if n % cfg.checkpoint_every == 0 or n == total:
                save_partial(partial, key, sums, loader)
            if n % cfg.log_every == 0 or n == total:
                rate = (time.perf_counter() - start) / (n - done_at_start)
                log.info(
                    "importance: batch %d/%d, %s loss %.4f, %.2f s/batch, %.0f s left",
                    n, total, loss, value, rate, rate * (total - n),
                )  # fmt: skip
            if n >= total:
                break
        if sums.batches == before:
            raise UserError("the corpus gave no batches; give a corpus with text (data.paths)")
    return sums


def plan_summary(plan: SparsityPlan, config) -> dict:
    """A plan with its student's parameters and GFLOPs per 128-token sequence."""
    student = sparse_config(config, plan)
    return {
        **plan.as_dict(),
        "params": sparse_params(student),
        "gflops": round(sparse_gflops(student, 128), 4),
    }


def write_scores(path: Path, scores: dict[str, torch.Tensor]) -> None:
    with open_atomic(path, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in scores.items()}))


def load_scores(sparsified_dir: str | Path) -> dict[str, torch.Tensor]:
    """The importance scores of a finished `lmdistill-sparsify` run."""
    path = Path(sparsified_dir).expanduser() / SCORES_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; run lmdistill-sparsify first (or fix the path)")
    return load_file(str(path))


def sparse_student(
    sparsified_dir: str | Path, sparsity: float, encoder_only: bool = False
) -> PreTrainedModel:
    """The student at `sparsity` sliced from a finished `lmdistill-sparsify` run: with the MLM
    head where the teacher has one, unless `encoder_only` (then the encoder and its pooler)."""
    scores = load_scores(sparsified_dir)
    reordered = Path(sparsified_dir).expanduser() / REORDERED_DIR
    mlm = has_mlm_head(_load_config(str(reordered), None, False)) and not encoder_only
    auto = AutoModelForMaskedLM if mlm else AutoModel
    with quiet_transformers():
        model = auto.from_pretrained(str(reordered), attn_implementation="sdpa").eval()
    plan = plan_sparsity(
        scores["head_normalized"], scores["neuron_normalized"], model.config.hidden_size, sparsity
    )
    return slice_model(model, plan)


def run(cfg: DictConfig, record_job: bool = True) -> dict:
    """Score, reorder, export; returns the summary. `record_job`: write the Hydra job's record
    (false where another entry point's job runs this, e.g. a cache fill by method=sparse_minilm)."""
    check_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if (out_dir / REORDERED_DIR).exists() or (out_dir / SCORES_FILE).exists():
        raise UserError(
            f"{out_dir} holds a finished sparsification; run in a fresh output directory"
        )
    device = resolve_device(str(cfg.device))
    model, loss = load_model(
        cfg.teacher.name_or_path, str(cfg.loss), cfg.teacher.revision, cfg.teacher.trust_remote_code
    )
    model.to(device)
    if record_job:
        write_job_record()  # .hydra/ (or .hydra/resume-<n>/), once the checks passed
    started = time.perf_counter()
    sums = score(cfg, model, loss, out_dir, device)
    model.cpu()
    head, neuron, hidden = (t.float() for t in sums.mean())
    head_n, neuron_n = normalize(head), normalize(neuron)
    orders = importance_order(head_n), importance_order(neuron_n), importance_order(hidden)
    write_scores(
        out_dir / SCORES_FILE,
        {"head": head, "neuron": neuron, "hidden": hidden, "head_normalized": head_n,
         "neuron_normalized": neuron_n, "head_order": orders[0], "neuron_order": orders[1],
         "hidden_order": orders[2]},
    )  # fmt: skip
    reorder_model(model, *orders)
    d = model.config.hidden_size
    plans = {
        f"s{s}": plan_summary(plan_sparsity(head_n, neuron_n, d, s), model.config)
        for s in SUPPORTED
    }
    record = {
        "lmdistill_version": __version__, "teacher": cfg.teacher.name_or_path, "loss": loss,
        "batches": sums.batches, "seed": cfg.seed,
        "data": OmegaConf.to_container(cfg.data, resolve=True), "scores": SCORES_FILE,
    }  # fmt: skip
    with quiet_transformers():
        reordered = export_student(
            model, cfg.data.tokenizer, out_dir / REORDERED_DIR, {**record, "reordered": True}
        )
        sparse_dir, student_info = None, None
        if cfg.get("sparsity") is not None:
            target = cfg.sparsity.target
            plan = plan_sparsity(head_n, neuron_n, d, target)
            student = slice_model(model, plan)
            sparse_dir = export_student(
                student, cfg.data.tokenizer, out_dir / f"sparse-s{target:g}",
                {**record, "sparsity": plan.as_dict()},
            )  # fmt: skip
            student_info = plan_summary(plan, model.config)
    summary = {
        **record,
        "loss_mean": sum(sums.losses) / max(len(sums.losses), 1),
        "seconds": round(time.perf_counter() - started, 1),
        "reordered_dir": str(reordered),
        "sparse_dir": str(sparse_dir) if sparse_dir else None,
        "student": student_info,
        "dense": {
            "params": sum(p.numel() for p in model.base_model.parameters()),
            "gflops": plans["s0"]["gflops"],
        },
        "plans": plans,
    }
    if cfg.get("cache_dir"):  # method=sparse_minilm finds the run there
        summary["cache_entry"] = str(publish(cfg.cache_dir, fingerprint(cfg, loss), out_dir))
    write_json_atomic(out_dir / "summary.json", summary)
    (out_dir / PARTIAL_FILE).unlink(missing_ok=True)
    log.info(
        "importance over %d batches (%s loss); reordered model: %s%s; summary: %s",
        sums.batches, loss, reordered, f"; student: {sparse_dir}" if sparse_dir else "",
        out_dir / "summary.json",
    )  # fmt: skip
    return summary


@report_hydra_errors
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sparsify")
@report_user_errors
def main(cfg: DictConfig) -> None:
    remember_job(cfg)  # its .hydra/ record is written once the checks pass
    with job_scope("lmdistill.sparsify"):
        run(cfg)


if __name__ == "__main__":
    main()
