"""Routing for mixtures of minimal experts: router, grouped dispatch, load balance, carving.

Dispatch never synchronises with the host: no `.item()`/`.tolist()` and no shape that depends on
the routing, so a GPU runs ahead of the Python code (DESIGN.md, "Where the time goes on a GPU").

* `dispatch`: a stable sort of the N = B*L positions by expert (padding is bucket E, so it sorts
  last) and the end row of every expert's group, `ends = searchsorted(sorted_experts, 0..E-1)`,
  kept on the device (`bincount` would read its maximum on the host on CUDA).
* Rows are moved with `permute_rows` / `unpermute_rows` (gather and `index_copy` of the full
  permutation, each the other's backward), so every tensor has N rows whatever the routing.
* `grouped_linear` multiplies each expert's contiguous rows by that expert's [in, out] weight:
  - `torch._grouped_mm(x, weight, offs=ends)` where it runs without a host read of the offsets:
    CPU (float32/bfloat16/float16) and CUDA bfloat16 on compute capability 9.x/10.x, with 16-byte
    aligned rows and pointers. Its CUDA fallback (other dtypes or GPUs) copies `offs` to the host,
    so it is never called there. One autograd function (`_GroupedMM`) runs the two backward
    grouped GEMMs itself: the kernel leaves the rows past `ends[-1]` (the padding) uninitialised
    in its output and in the input gradient, and they are zeroed here; the bias goes in and out
    through a [N, E] one-hot matmul (zero for padding rows).
  - elsewhere (CUDA float32/float16, older GPUs, unaligned sizes), `_tiled_linear`: each expert's
    rows are padded to a multiple of a tile of T rows in a buffer of a fixed ceil(N/T) + E tiles,
    every tile then belongs to one expert, and one `bmm` multiplies the tiles by their experts'
    gathered weights. FLOPs: the real tokens plus at most E*T filler rows per call (T about
    N/(8E)), not E times the dense FFN; plain autograd.
  Padding rows are never multiplied (they lie past `ends[-1]`, or are not put in a tile) and come
  out exactly 0. Every expert's stacked parameters receive a gradient, zero for an expert without
  tokens, so DDP needs no `find_unused_parameters`.
* Load-balance statistics are masked sums over the N positions, also without a host read.
"""

from __future__ import annotations

import contextlib
import functools
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
    """Elements of the widened (E*n) sublayer that expert e takes (docs/methods.md section 5).

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
    """Grouping of the N positions of one MoE sublayer by expert, all on the device."""

    order: torch.Tensor  # [N] flat positions sorted by expert (stable); padding (bucket E) last
    expert: torch.Tensor  # [N] expert of each sorted row; E for padding
    ends: torch.Tensor  # [E] int32 end row of each expert's group (cumulative token counts)
    pad: torch.Tensor  # [N, 1] bool: padding rows of the sorted order (rows >= ends[-1])


def dispatch(expert: torch.Tensor, num_experts: int) -> Dispatch:
    """Group positions by expert: a stable sort and a `searchsorted` for the group ends.

    expert [N] holds the chosen expert, E for padding; no value is read on the host.
    """
    sorted_expert, order = torch.sort(expert, stable=True)
    buckets = torch.arange(num_experts, device=expert.device, dtype=sorted_expert.dtype)
    ends = torch.searchsorted(sorted_expert, buckets, right=True, out_int32=True)  # [E]
    return Dispatch(order, sorted_expert, ends, (sorted_expert == num_experts)[:, None])


class _Permute(torch.autograd.Function):
    """rows[order] for a permutation `order`; backward: `index_copy` of the gradient."""

    @staticmethod
    def forward(ctx, rows, order):
        ctx.save_for_backward(order)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return torch.empty_like(grad).index_copy_(0, order, grad), None


class _Unpermute(torch.autograd.Function):
    """out[order] = rows for a permutation `order` (the inverse of `_Permute`)."""

    @staticmethod
    def forward(ctx, rows, order):
        ctx.save_for_backward(order)
        return torch.empty_like(rows).index_copy_(0, order, rows)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None


def permute_rows(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """rows [N, ...] in dispatch order: rows[order] (gather; the backward is a copy, no adds)."""
    return _Permute.apply(rows, order)


def unpermute_rows(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Sorted rows [N, ...] back to their positions: out[order] = rows."""
    return _Unpermute.apply(rows, order)


@functools.cache
def _cuda_grouped_mm_arch(index: int) -> bool:
    """Whether `torch._grouped_mm` has its sync-free kernel on this GPU (sm 9.x / 10.x, CUDA)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] in (9, 10)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs x [N, in] @ weight [E, in, out] without a host sync.

    Decided from metadata only (device, dtype, sizes, pointers): CPU in float32, bfloat16 or
    float16, CUDA in bfloat16 on compute capability 9.x or 10.x (elsewhere on CUDA the op falls
    back to a loop that copies the offsets to the host); rows and pointers aligned to 16 bytes.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    device = x.device
    if device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    elif device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if x.dtype != torch.bfloat16 or not _cuda_grouped_mm_arch(index):
            return False
    else:
        return False
    align = 16 // x.element_size()
    aligned = all(s % align == 0 for s in weight.shape[-2:])
    contiguous = x.is_contiguous() and weight.is_contiguous()
    return aligned and contiguous and x.data_ptr() % 16 == weight.data_ptr() % 16 == 0


def _one_hot(expert: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, E] one-hot of the sorted experts; all-zero rows for padding (bucket E)."""
    buckets = torch.arange(num_experts, device=expert.device)
    return (expert[:, None] == buckets).to(dtype)


class _GroupedMM(torch.autograd.Function):
    """y = x @ weight[e] + bias[e] per expert group via `torch._grouped_mm`; padding rows 0.

    Forward and backward each run the grouped GEMMs of `torch._grouped_mm`'s own derivative
    (dX = dY @ W^T grouped by rows, dW = X^T @ dY grouped along the contraction), and zero the
    rows past `ends[-1]` that the kernel leaves uninitialised. The bias is added and its
    gradient summed per expert by a matmul with the [N, E] one-hot of the experts. An expert
    without tokens gets a zero weight gradient (masked explicitly on GPUs: some kernels leave
    empty groups unwritten).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ends, expert, pad):
        one_hot = _one_hot(expert, weight.shape[0], x.dtype)  # [N, E]
        out = torch._grouped_mm(x, weight, offs=ends)
        out.masked_fill_(pad, 0).addmm_(one_hot, bias)
        ctx.save_for_backward(x, weight, ends, one_hot, pad)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, ends, one_hot, pad = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch._grouped_mm(grad, weight.transpose(-2, -1), offs=ends)
            grad_x.masked_fill_(pad, 0)
        if need_w:
            grad_w = torch._grouped_mm(x.t(), grad, offs=ends)  # [E, in, out]
            if grad_w.device.type != "cpu":
                empty = torch.diff(ends, prepend=ends.new_zeros(1)) == 0
                grad_w = grad_w.masked_fill(empty[:, None, None], 0)
        if need_b:
            grad_b = one_hot.t() @ grad  # [E, out]
        return grad_x, grad_w, grad_b, None, None, None


def _tile_rows(n: int, num_experts: int) -> int:
    """Rows per tile of `_tiled_linear`: a power of two near n / (8 E), at least 16."""
    target = max(1, -(-n // (8 * num_experts)))
    return max(16, 1 << (target - 1).bit_length())


def _tiled_linear(x, weight, bias, route: Dispatch) -> torch.Tensor:
    """The same product as `_GroupedMM` from plain ops with routing-independent shapes.

    Each expert's rows are padded up to a multiple of T rows inside a buffer of ceil(N/T) + E
    tiles (enough for any routing), so every tile holds rows of one expert; one `bmm` multiplies
    the tiles by their experts' weights (gathered per tile), and the rows are gathered back.
    Filler rows are zeros; padding rows are never put into a tile and come out 0.
    """
    n, num_experts = x.shape[0], weight.shape[0]
    tile = _tile_rows(n, num_experts)
    tiles = -(-n // tile) + num_experts
    ends = route.ends.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [E]
    padded_ends = torch.cumsum((counts + tile - 1) // tile * tile, 0)  # [E]
    shift = padded_ends - (counts + tile - 1) // tile * tile - (ends - counts)  # slot - row
    slot = torch.arange(tiles * tile, device=x.device)
    slot_expert = torch.searchsorted(padded_ends, slot, right=True)  # E past the last group
    e = slot_expert.clamp_max(num_experts - 1)
    row = slot - shift[e]
    used = (slot_expert < num_experts) & (row < ends[e])
    rows = x.index_select(0, torch.where(used, row, 0))
    rows = torch.where(used[:, None], rows, 0).view(tiles, tile, -1)
    tile_expert = e.view(tiles, tile)[:, 0]  # [tiles]
    out = torch.bmm(rows, weight.index_select(0, tile_expert)).view(tiles * tile, -1)
    expert = route.expert.clamp_max(num_experts - 1)  # [N]
    back = torch.arange(n, device=x.device) + shift[expert]
    out = out.index_select(0, torch.where(route.pad[:, 0], 0, back)) + bias.index_select(0, expert)
    return out.masked_fill(route.pad, 0)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, route: Dispatch
) -> torch.Tensor:
    """x [N, in] in dispatch order, weight [E, in, out], bias [E, out] -> [N, out].

    Row i is multiplied by its expert's weight (`route.expert[i]`); padding rows are not
    computed and are 0 in the output. `torch._grouped_mm` where it is sync-free, else the tiled
    `bmm` (`grouped_mm_supported`). Under autocast, x, weight and bias are cast once to the
    autocast dtype (as `nn.Linear` under autocast; the casts are differentiable, so gradients
    reach the float32 parameters).
    """
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device)  # False on "meta" (the tests)
    if autocast and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    x, weight, bias = (t.to(dtype) for t in (x, weight, bias))  # no-ops when already dtype
    x = x.contiguous()
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        if grouped_mm_supported(x, weight):
            return _GroupedMM.apply(x, weight, bias, route.ends, route.expert, route.pad)
        return _tiled_linear(x, weight, bias, route)


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
    counts = _one_hot(stats.expert.detach(), num_experts, torch.float32).sum(0)  # no bincount sync
    return counts / counts.sum().clamp_min(1)


def router_entropy(stats: RoutingStats) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution over real tokens (detached)."""
    probs = stats.probs.detach().float()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [N]
    real = stats.real.float()
    return (entropy * real).sum() / real.sum().clamp_min(1.0)
