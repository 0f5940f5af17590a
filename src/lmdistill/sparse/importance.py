"""First-order Taylor importance of heads, FFN neurons and hidden dims (docs/methods.md section 6).

For every batch: masks at 1 (`lmdistill.sparse.masking`), a loss, one backward pass into the
masks only (the model's weights need no gradient), and |d loss / d mask| added to running sums.
The importance is the mean over batches; head and neuron scores are then divided by their
per-layer L2 norm (`normalize`).

Losses:
* `mlm`: masked-LM cross-entropy (15% of the real non-special tokens chosen; of these 80% become
  [MASK], 10% a random token, 10% stay), for models with an MLM head;
* `relation`: self-distillation of the unpruned model: the relation KL (`losses.relation_kl`,
  R relation heads) between the final hidden states of the model in eval mode (no dropout, the
  target) and of the masked model with dropout on. The final hidden states depend on every mask,
  so every head, neuron and hidden dim gets a score (the last layer's Q/K/V would leave that
  layer's attention output and FFN without one).

Each batch draws its MLM choices and dropout from `seed` and the batch index alone, so a resumed
accumulation equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmdistill.losses import relation_kl
from lmdistill.sparse.masking import Masks, apply_masks

LOSSES = ("mlm", "relation")


@dataclass(frozen=True)
class MLMSpec:
    """What MLM masking needs from the tokenizer."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    probability: float = 0.15

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> MLMSpec:
        return cls(int(tokenizer.mask_token_id), int(vocab_size), tuple(tokenizer.all_special_ids))


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, spec: MLMSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: (masked input ids [B, L], labels [B, L] with -100 where nothing is predicted)."""
    ids = input_ids.cpu()
    special = torch.isin(ids, torch.tensor(spec.special_ids)) | (attention_mask.cpu() == 0)
    chosen = (torch.rand(ids.shape, generator=generator) < spec.probability) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(spec.vocab_size, ids.shape, generator=generator)
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(ids, spec.mask_token_id), ids)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked)
    return masked.to(input_ids.device), labels.to(input_ids.device)


def mlm_loss(model: nn.Module, batch: dict, spec: MLMSpec, generator: torch.Generator):
    """Mean cross-entropy over the chosen tokens (0 without any)."""
    masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], spec, generator)
    logits = model(
        input_ids=masked,
        attention_mask=batch["attention_mask"],
        token_type_ids=batch.get("token_type_ids"),
    ).logits  # [B, L, V]
    total = nn.functional.cross_entropy(
        logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
        labels.flatten(),
        ignore_index=-100,
        reduction="sum",
    )
    return total / (labels != -100).sum().clamp_min(1)


def relation_self_loss(base: nn.Module, batch: dict, masks: Masks, relation_heads: int):
    """Relation KL of the final hidden states: unmasked eval model -> masked model with dropout."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    base.eval()
    with torch.no_grad():
        target = base(**inputs).last_hidden_state  # [B, L, d]
    base.train()
    try:
        with apply_masks(base, masks):
            hidden = base(**inputs).last_hidden_state  # [B, L, d]
    finally:
        base.eval()
    return relation_kl((target, target), (hidden, hidden), batch["attention_mask"], relation_heads)


@dataclass
class ImportanceSums:
    """Running sums of |d loss / d mask| over `batches` batches (float64)."""

    head: torch.Tensor  # [layers, A]
    neuron: torch.Tensor  # [layers, I]
    hidden: torch.Tensor  # [d]
    batches: int = 0
    losses: list[float] = field(default_factory=list)

    @classmethod
    def zeros(cls, config) -> ImportanceSums:
        masks = Masks.ones(config, dtype=torch.float64)
        return cls(*(torch.zeros_like(t) for t in masks.tensors()))

    def state_dict(self) -> dict:
        return {
            "head": self.head, "neuron": self.neuron, "hidden": self.hidden,
            "batches": self.batches, "losses": list(self.losses),
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict) -> ImportanceSums:
        return cls(
            state["head"], state["neuron"], state["hidden"], int(state["batches"]), state["losses"]
        )

    def mean(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = max(self.batches, 1)
        return self.head / n, self.neuron / n, self.hidden / n


def accumulate(
    model: nn.Module,
    batch: dict,
    sums: ImportanceSums,
    loss: str,
    seed: int,
    relation_heads: int | None = None,
    mlm: MLMSpec | None = None,
) -> float:
    """Add one batch's |d loss / d mask| to `sums`; returns the loss.

    model: the unpruned model (with an MLM head for loss="mlm"), weights frozen; batch: tensors
    on the model's device. Randomness (MLM choices, dropout) comes from (seed, batch index).
    """
    device = next(model.parameters()).device
    masks = Masks.ones(model.config, requires_grad=True, device=device)
    index = sums.batches
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    torch.manual_seed(seed * 1_000_003 + index)  # dropout of the masked pass
    if loss == "mlm":
        model.eval()
        with apply_masks(model, masks):
            value = mlm_loss(model, batch, mlm, generator)
    else:
        value = relation_self_loss(model.base_model, batch, masks, relation_heads)
    grads = torch.autograd.grad(value, masks.tensors(), allow_unused=True)
    for total, grad in zip((sums.head, sums.neuron, sums.hidden), grads, strict=True):
        if grad is not None:
            total += grad.detach().abs().to(total)
    sums.batches += 1
    loss_value = float(value.detach())
    sums.losses.append(loss_value)
    return loss_value


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Divide each layer's scores [layers, n] by their L2 norm (a layer of zeros stays 0)."""
    norm = scores.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, scores / norm.clamp_min(torch.finfo(scores.dtype).tiny), 0.0)


def importance_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, most important first (ties: lower index first)."""
    return torch.sort(-scores, dim=-1, stable=True).indices
