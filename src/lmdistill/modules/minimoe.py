"""MiniMoE: MiniLM v2 relations into a mixture-of-minimal-experts student (METHODS.md section 5).

L = (w_qq KL_QQ + w_kk KL_KK + w_vv KL_VV) / (w_qq + w_kk + w_vv) + balance_weight * LB, with LB
the Switch load-balancing loss averaged over MoE sublayers (per kind, then over kinds).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from lmdistill.errors import UserError
from lmdistill.models.capture import QKV, _Captured
from lmdistill.models.moe import (
    MiniMoEModel,
    expert_load,
    load_balance,
    minimoe_config,
    minimoe_gflops,
    router_entropy,
)
from lmdistill.modules.base import DistillationModule, _model_inputs
from lmdistill.modules.minilm import (
    _check_reduction,
    _check_teacher_layer,
    check_relation_heads,
    check_relation_weights,
    self_relation_terms,
)


@dataclass
class MoESettings:
    """The `moe` config group (conf/moe/*.yaml)."""

    attention_experts: int = 1  # x: attention experts per layer (1 = dense attention)
    ffn_experts: int = 4  # y: FFN experts per layer (1 = dense FFN)
    balance_weight: float = 0.01  # weight of the load-balancing loss
    router_noise: float = 0.1  # U(-noise, noise) on router logits in training
    init: str = "carve"  # carve (original work) | independent


class MiniMoE(DistillationModule):
    """Q-Q, K-K, V-V relation distillation into a MiniMoE student built in the dense student's shape.

    `student` is the dense student that `lmdistill-distill` builds from `student=`; its config
    gives the shape (and, for BERT students, the weights of embeddings and dense sublayers).
    """

    def __init__(
        self,
        teacher,
        student,
        moe: dict | MoESettings | None = None,
        relation_heads: int = 32,
        relation_weights: dict | None = None,
        reduction: str = "rows",
        teacher_layer: int | None = None,
        relation_site: str = "top_projection",
        optim: dict | None = None,
    ):
        settings = moe if isinstance(moe, MoESettings) else MoESettings(**(moe or {}))
        relation_heads = check_relation_heads(relation_heads, teacher, student)
        _check_teacher_layer(teacher_layer, teacher)
        if float(settings.balance_weight) < 0:
            raise UserError(f"moe.balance_weight={settings.balance_weight} must be >= 0")
        self.moe = settings
        super().__init__(teacher, build_moe_student(student, settings), relation_site, optim)
        self.relation_heads = relation_heads
        self.relation_weights = check_relation_weights(relation_weights)
        self.reduction = _check_reduction(reduction)

    # --- forward and loss --------------------------------------------------------------------

    def student_qkv(self, batch: dict) -> QKV:
        if self.relation_site == "last_layer" and self.student.config.attention_experts > 1:
            return self._last_layer_moe_qkv(batch)
        return super().student_qkv(batch)

    def _last_layer_moe_qkv(self, batch: dict) -> QKV:
        """Q/K/V of the last layer's attention experts (each token's own expert); stops there."""
        layer = self.student.encoder.layer[-1]

        def hook(_module, args):
            hidden, _mask, real = args
            (q, k, v), *_ = layer.attention.project_qkv(hidden, real)
            raise _Captured(QKV(q, k, v))

        handle = layer.register_forward_pre_hook(hook)
        try:
            self.student(**_model_inputs(batch, self.student.config))
        except _Captured as captured:
            return captured.qkv
        finally:
            handle.remove()
        raise RuntimeError("the student's last layer was never reached")

    def loss_terms(self, teacher: QKV, student: QKV, attention_mask: torch.Tensor) -> dict:
        terms = self_relation_terms(teacher, student, attention_mask, self.relation_heads,
                                    self.relation_weights, self.reduction, self._relation_plan)  # fmt: skip
        balance = self.balance_loss()
        if balance is not None:
            terms["balance"] = balance
        return terms

    def balance_loss(self) -> torch.Tensor | None:
        """LB of the last student forward: mean over layers per kind, then over kinds."""
        per_kind = defaultdict(list)
        for routing in self.student.routing:
            per_kind[routing.kind].append(load_balance(routing.stats))
        if not per_kind:
            return None
        return torch.stack([torch.stack(v).mean() for v in per_kind.values()]).mean()

    def combine(self, terms: dict) -> torch.Tensor:
        total = sum(self.relation_weights.values())
        relation = sum(
            self.relation_weights[n] * terms[n] for n in ("qq", "kk", "vv") if n in terms
        )
        loss = relation / total
        if "balance" in terms:
            loss = loss + self.moe.balance_weight * terms["balance"]
        return loss

    # --- visibility --------------------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if not self.student.routing or self.global_step % max(every, 1):
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

        step = self.global_step
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

    # --- summary -----------------------------------------------------------------------------

    def student_gflops(self, seq_len: int = 128) -> float:
        """One expert per sublayer per token plus the routers (`minimoe_gflops`)."""
        return minimoe_gflops(self.student.config, seq_len)


def build_moe_student(dense, settings: MoESettings) -> MiniMoEModel:
    """A MiniMoE student of the dense student's shape.

    For BERT students, parameters with the same name and shape (embeddings, dense sublayers,
    pooler) are copied from `dense`, so `student.init_from_teacher` carries over and a 1x1
    student equals the dense one; MoE sublayers are initialised by `settings.init`.
    """
    config = minimoe_config(
        dense.config, settings.attention_experts, settings.ffn_experts,
        settings.router_noise, settings.init,
    )  # fmt: skip
    student = MiniMoEModel._from_config(config, attn_implementation="sdpa")
    if getattr(dense.config, "model_type", None) == "bert":
        own = student.state_dict()
        same = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
        student.load_state_dict(same, strict=False)
    return student
