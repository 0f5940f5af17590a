"""The optimizer of every method: AdamW, weight decay by parameter role, linear warmup/decay.

Weight decay (docs/methods.md section 10) reaches exactly the weight matrices: `nn.Linear` and
`nn.Embedding` weights and the stacked expert matrices of MiniMoE sublayers (`*_weight`). Biases
(`bias`, stacked `*_bias`) and LayerNorm parameters are not decayed, whatever their shape.
Embeddings are decayed, as in the BERT and MiniLM recipes, whose only exclusions are biases and
LayerNorm. A parameter of any other role is an error, so a new module must say what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmdistill.errors import UserError
from lmdistill.schedule import LinearWarmupDecay


@dataclass
class OptimSettings:
    """AdamW with linear warmup then linear decay to 0 (the `optim` config group)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01  # weight matrices and embeddings only (see `decays`)
    warmup_ratio: float = 0.01  # fraction of the total optimizer steps
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a non-finite loss


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def decays(module: nn.Module, name: str) -> bool:
    """Whether parameter `name` (its own name in `module`, e.g. `weight`) is weight-decayed."""
    if isinstance(module, _NORMS) or type(module).__name__.endswith("LayerNorm"):
        return False
    if name == "bias" or name.endswith("_bias"):
        return False
    if name == "weight" or name.endswith("_weight"):
        return True
    raise ValueError(
        f"no weight-decay role for parameter '{name}' of {type(module).__name__}; name it "
        "`*weight` (decayed) or `*bias` (not decayed)"
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] parameter groups of the trainable parameters of `model`."""
    decayed, plain = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad:
                (decayed if decays(module, name) else plain).append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def configure_adamw(model: nn.Module, settings: OptimSettings, total_steps: float) -> dict:
    """Fused AdamW and the warmup/decay schedule, as Lightning's `configure_optimizers` returns."""
    # fused: one kernel for all parameters (4x foreach on CPU), and it skips an update on the
    # device (`found_inf`, see grad_guard); Lightning's clipping is replaced by ours
    optimizer = torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        fused=True,
    )
    if total_steps == float("inf"):
        raise UserError(
            "the number of training steps is unknown (the corpus is streamed); set trainer.max_steps"
        )
    warmup = settings.warmup_steps
    warmup = round(settings.warmup_ratio * total_steps) if warmup is None else int(warmup)
    # resumable under a changed max_steps or optim (resume.allow): see lmdistill.schedule
    scheduler = LinearWarmupDecay(optimizer, warmup, int(total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
