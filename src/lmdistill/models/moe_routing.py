"""Routing for mixtures of minimal experts: router, grouped dispatch, load balance, carving.

Dispatch without a Python loop over tokens: tokens are sorted by their expert (padding goes to
an extra bucket E that is never computed), each expert runs on its contiguous slice of the
sorted tokens (a loop over the E experts), and results are scattered back with `index_copy`.
The slice sizes are read from the device once per MoE sublayer (`counts.tolist()`, the only host
synchronisation); everything else, including the load-balance statistics, stays on the device.
Experts' weights are stacked ([E, ...] parameters) and `grouped_linear` is one autograd
function whose backward writes each expert's weight gradient into its slice of one [E, in, out]
tensor, so every expert's parameters receive a gradient (zero when an expert gets no token):
DDP needs no `find_unused_parameters`. (Indexing the stacked weight per expert instead made
autograd build a zero-filled [E, in, out] gradient per expert and sum them, and `cat` the
outputs: with 2 CPU threads that took about half of the MoE FFN's time.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class RoutingStats(NamedTuple):
    """Routing of one MoE sublayer over all B*L positions; `real` marks non-padding tokens."""

    probs: torch.Tensor  # [N, E] router probabilities (differentiable)
    expert: torch.Tensor  # [N] chosen expert; E for padding (never computed)
    real: torch.Tensor  # [N] bool, True for real tokens

    def real_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [n, E], expert [n]) of the real tokens only (a host sync: for logging/tests)."""
        return self.probs[self.real], self.expert[self.real]


def carve_indices(n: int, num_experts: int) -> list[list[int]]:
    """Elements of the widened (E*n) sublayer that expert e takes (METHODS.md section 5).

    Expert e gets `[0..m-1] ++ [m+e, m+e+E, m+e+2E, ...]` truncated to n, with m = floor(2n/3)
    shared elements.
    """
    m = (2 * n) // 3
    return [
        list(range(m)) + [m + e + k * num_experts for k in range(n - m)] for e in range(num_experts)
    ]


class MiniMoERouter(nn.Module):
    """`Linear(d, E)`; uniform noise on the logits in training; softmax; hard top-1."""

    def __init__(self, hidden_size: int, num_experts: int, noise: float):
        super().__init__()
        self.num_experts = num_experts
        self.noise = noise
        self.classifier = nn.Linear(hidden_size, num_experts)

    def forward(
        self, hidden: torch.Tensor, real: torch.Tensor
    ) -> tuple[RoutingStats, torch.Tensor]:
        """hidden [N, d], real [N] bool -> (stats, gate [N]); gate = probability of the choice."""
        logits = self.classifier(hidden).float()  # [N, E], float32 also under autocast
        if self.training and self.noise > 0:
            logits = logits + torch.empty_like(logits).uniform_(-self.noise, self.noise)
        probs = logits.softmax(-1)
        gate, expert = probs.max(-1)  # [N], [N]
        expert = torch.where(real, expert, torch.full_like(expert, self.num_experts))
        return RoutingStats(probs, expert, real), gate


class Dispatch(NamedTuple):
    """Positions of the real tokens sorted by expert, and how many each expert got."""

    order: torch.Tensor  # [n] flat positions of real tokens, grouped by expert
    counts: list[int]  # [E] tokens per expert (host ints: the one sync of the sublayer)


def dispatch(expert: torch.Tensor, num_experts: int) -> Dispatch:
    """Group tokens by expert: a stable sort, a bincount and one read of the E+1 counts."""
    order = torch.argsort(expert, stable=True)  # [N], padding (bucket E) last
    counts = torch.bincount(expert, minlength=num_experts + 1).tolist()
    return Dispatch(order[: sum(counts[:num_experts])], counts[:num_experts])


class _GroupedLinear(torch.autograd.Function):
    """y[slice_e] = x[slice_e] @ weight[e] + bias[e] for contiguous slices, with explicit backward.

    Each expert's matmuls write into one preallocated output (no per-expert `cat`), and the
    backward writes each expert's weight gradient straight into its row of one [E, in, out]
    tensor (no per-expert zero-filled [E, in, out] gradient from indexing a stacked parameter,
    no accumulation); an expert without tokens gets a zero gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        out = x.new_empty(x.shape[0], weight.shape[-1])
        start = 0
        for e, count in enumerate(counts):
            if count:
                torch.addmm(bias[e], x[start : start + count], weight[e],
                            out=out[start : start + count])  # fmt: skip
            start += count
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad.new_empty(weight.shape[0], weight.shape[-1]) if need_b else None
        start = 0
        for e, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            if not count:
                if need_w:
                    grad_w[e].zero_()
                if need_b:
                    grad_b[e].zero_()
                continue
            if need_x:
                torch.mm(grad[rows], weight[e].t(), out=grad_x[rows])
            if need_w:
                torch.mm(x[rows].t(), grad[rows], out=grad_w[e])
            if need_b:
                torch.sum(grad[rows], 0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """x [n, in] grouped by expert, weight [E, in, out], bias [E, out] -> [n, out].

    Expert e multiplies its contiguous slice of `counts[e]` rows (one matmul per expert, no
    copies of slices or weights); every expert's parameters get a gradient, zero for an expert
    without tokens. Under autocast, x, weight and bias are cast once to the autocast dtype (as
    `nn.Linear` under autocast; the casts are differentiable, so gradients reach the float32
    parameters).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    x, weight, bias = (t.to(dtype) for t in (x, weight, bias))  # no-ops when already dtype
    with torch.autocast(device, enabled=False):
        return _GroupedLinear.apply(x.contiguous(), weight, bias, counts)


def scatter_rows(values: torch.Tensor, order: torch.Tensor, total: int) -> torch.Tensor:
    """Rows of `values` [n, k] back to their positions in a zero [total, k] tensor."""
    out = values.new_zeros(total, values.shape[-1])
    return out.index_copy(0, order, values)


def load_balance(stats: RoutingStats) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e P_e over real tokens (1 at a uniform split).

    f_e: fraction of real tokens routed to e; P_e: mean router probability of e over real
    tokens. Padding is excluded by masking (no host sync); float32.
    """
    num_experts = stats.probs.shape[-1]
    real = stats.real.float()  # [N]
    count = real.sum().clamp_min(1.0)
    routed = torch.zeros_like(stats.probs).scatter_(
        1, stats.expert.clamp_max(num_experts - 1)[:, None], 1.0
    )  # [N, E] one-hot (padding rows masked below)
    fraction = (routed * real[:, None]).sum(0) / count  # [E]
    mean_prob = (stats.probs.float() * real[:, None]).sum(0) / count  # [E]
    return num_experts * (fraction * mean_prob).sum()


def expert_load(stats: RoutingStats) -> torch.Tensor:
    """Fraction of real tokens per expert [E] (detached)."""
    num_experts = stats.probs.shape[-1]
    counts = torch.bincount(stats.expert.detach(), minlength=num_experts + 1)[:num_experts]
    return counts.float() / counts.sum().clamp_min(1)


def router_entropy(stats: RoutingStats) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution over real tokens (detached)."""
    probs = stats.probs.detach().float()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [N]
    real = stats.real.float()
    return (entropy * real).sum() / real.sum().clamp_min(1.0)
