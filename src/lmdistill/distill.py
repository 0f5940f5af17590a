"""lmdistill-distill: distil a teacher into a student, export it, write summary.json.

    lmdistill-distill teacher=minilm-l6-local student=L3-H384 method=minilm_v2 trainer.max_steps=300
    lmdistill-distill -m student=L3-H384,L4-H384 method=minilm_v1,minilm_v2
    lmdistill-distill -m method=minilm_v2,minimoe moe=1x1,1x4
    lmdistill-distill student=L6-H384 assistant=default    (teacher -> assistant -> student)
    lmdistill-distill eval=glue eval.tasks=[rte,mrpc]        (then GLUE fine-tuning, in summary.json)

Composes the config and hands it to the pipeline (`lmdistill.pipeline`), which instantiates
teacher, student, method and data, fits, exports and summarises; with an `assistant`, the
two stages run through `lmdistill.assistant`. With `eval=glue`, rank 0 then fine-tunes the
exported student(s) on GLUE (`lmdistill.glue.attached`).
"""

from __future__ import annotations

import warnings

import hydra
from omegaconf import DictConfig

from lmdistill.assistant import run_with_assistant
from lmdistill.distributed import job_scope
from lmdistill.errors import report_user_errors
from lmdistill.glue.attached import evaluate_run
from lmdistill.hydra_errors import report_hydra_errors
from lmdistill.pipeline import build, run
from lmdistill.resources import CONF_DIR, register_resolvers
from lmdistill.runs import remember_job
from lmdistill.tracking import finish_job_wandb_run, update_wandb_summary

register_resolvers()
# Deprecation notices raised inside torchdata and Lightning themselves; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")

__all__ = ["build", "main", "run"]


@report_hydra_errors
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="distill")
@report_user_errors
def main(cfg: DictConfig) -> None:
    remember_job(cfg)  # its .hydra/ record is written once the checks pass (runs.write_job_record)
    with job_scope("lmdistill.distill"):  # the next job of a sweep starts with a clean process
        try:
            if cfg.get("assistant") is not None:
                summary = run_with_assistant(cfg)
            else:
                summary = run(cfg)
            update_wandb_summary(summary)  # the job's W&B run: summary.json's values (rank 0)
            if summary and cfg.get("eval") is not None:  # global rank 0, after the export barrier
                evaluate_run(cfg, summary)
        finally:
            finish_job_wandb_run()  # with the GLUE scores in its summary


if __name__ == "__main__":
    main()
