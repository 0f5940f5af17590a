"""MiniMoE: MiniLM v2 relations into a mixture-of-minimal-experts student (docs/methods.md
section 5).

L = (w_qq KL_QQ + w_kk KL_KK + w_vv KL_VV) / (w_qq + w_kk + w_vv) + balance_weight * LB, with LB
the Switch load-balancing loss averaged over MoE sublayers (per kind, then over kinds). The
student is built by the `student` group's builder with the `moe` group's experts; with moe=1x1 it
is a dense student and LB is absent.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lmdistill.errors import UserError
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.relations import (
    QKVRelationSteps,
    check_reduction,
    check_relation_heads,
    check_relation_site,
    check_relation_weights,
    relation_settings,
    self_relation_terms,
    top_projection,
    weighted_relation,
)
from lmdistill.models.capture import QKV
from lmdistill.models.moe import expert_load, load_balance, router_entropy


class MiniMoE(QKVRelationSteps, DistillationMethod):
    """Q-Q, K-K, V-V relation distillation into a MiniMoE student, plus load balancing.

    relation_site: null means top_projection (the original MiniMoE work).
    """

    accepts_moe = True

    def __init__(
        self,
        teacher,
        student,
        balance_weight: float = 0.01,
        relation_heads: int = 32,
        relation_weights: dict | None = None,
        reduction: str = "rows",
        relation_site: str | None = None,
        optim: dict | None = None,
    ):
        relation_heads = check_relation_heads(relation_heads, teacher, student)
        if float(balance_weight) < 0:
            raise UserError(f"moe.balance_weight={balance_weight} must be >= 0")
        super().__init__(teacher, student, optim)
        self.balance_weight = float(balance_weight)
        self.relation_heads = relation_heads
        self.relation_weights = check_relation_weights(relation_weights)
        self.reduction = check_reduction(reduction)
        self.relation_site = check_relation_site(relation_site, "top_projection")
        top = self.relation_site == "top_projection"
        self.relation_projection = top_projection(student) if top else None

    # --- forward and loss --------------------------------------------------------------------

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        terms = self_relation_terms(teacher, student, attention_mask, self.relation_heads,
                                    self.relation_weights, self.reduction, self.batch_plan)  # fmt: skip
        balance = self.balance_loss()
        if balance is not None:
            terms["balance"] = balance
        return terms

    def balance_loss(self) -> torch.Tensor | None:
        """LB of the last student forward: mean over layers per kind, then over kinds."""
        per_kind = defaultdict(list)
        for routing in getattr(self.student, "routing", ()):  # a dense (1x1) student: none
            per_kind[routing.kind].append(load_balance(routing.stats))
        if not per_kind:
            return None
        return torch.stack([torch.stack(v).mean() for v in per_kind.values()]).mean()

    def combine(self, terms: dict) -> torch.Tensor:
        loss = weighted_relation(terms, self.relation_weights)
        if "balance" in terms:
            loss = loss + self.balance_weight * terms["balance"]
        return loss

    def summary_fields(self) -> dict:
        return {**super().summary_fields(), **relation_settings(self),
                "balance_weight": self.balance_weight}  # fmt: skip

    # --- visibility --------------------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if not getattr(self.student, "routing", None) or self.global_step % max(every, 1):
            return
        self.log_routing()

    def log_routing(self) -> dict[str, torch.Tensor]:
        """Per-layer expert load and router entropy of the last forward, as scalars (layers
        1-indexed) and, where TensorBoard or W&B loggers are attached, as histograms/tables."""
        metrics, rows = {}, []
        for routing in self.student.routing:
            tag = f"moe/layer{routing.layer + 1}_{routing.kind}"
            load = expert_load(routing.stats)
            for e, value in enumerate(load):
                metrics[f"{tag}/load_e{e}"] = value
            metrics[f"{tag}/entropy"] = router_entropy(routing.stats)
            rows += [(routing.layer + 1, routing.kind, e, float(v)) for e, v in enumerate(load)]
        if self._trainer is not None:
            self.log_dict(metrics, on_step=True, on_epoch=False)
            self._log_routing_tables(rows)
        return metrics

    def _log_routing_tables(self, rows: list[tuple]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = self.logged_step()  # the step of the scalars logged with them
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for routing in self.student.routing:
                    chosen = routing.stats.expert[routing.stats.real].detach().cpu()
                    e = routing.stats.probs.shape[-1]
                    logger.experiment.add_histogram(
                        f"moe/layer{routing.layer + 1}_{routing.kind}/experts", chosen, step,
                        bins=torch.arange(e + 1).double().sub(0.5).tolist(),
                    )  # fmt: skip
            elif isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(columns=["layer", "kind", "expert", "load"], data=rows)
                logger.experiment.log({"moe/expert_load": table, "trainer/global_step": step})
