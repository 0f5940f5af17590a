"""Gradient clipping and the skip of non-finite updates, decided on the device.

Lightning's clipping and a Python `if` on the loss both read a tensor on the host every step.
Here the total gradient norm, the clip factor and the skip decision stay tensors:

* without a gradient scaler (32, bf16-mixed), the optimizer is fused AdamW, which takes a
  `found_inf` tensor and leaves weights, moments and its step count untouched where it is 1;
* with one (16-mixed), gradients are still scaled when this runs (a fused optimizer unscales
  inside its step); the clip factor is computed in unscaled units, and a step to skip gets NaN
  gradients, which the scaler detects and skips as it does an overflow.

Because DDP has all-reduced the gradients already, every rank takes the same decision; a
non-finite loss on any rank reaches all of them through `loss_nonfinite` (summed over ranks).
"""

from __future__ import annotations

import torch


def clip_and_guard(
    optimizer: torch.optim.Optimizer,
    max_norm: float | None,
    loss_nonfinite: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Clip the gradients to L2 norm `max_norm` (None or 0: no clipping); returns whether the
    update is skipped ([] bool on the device), arranging the skip as described above."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]  # fmt: skip
    if not grads:
        return loss_nonfinite
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # [] float32, scaled under 16-mixed
    skipped = loss_nonfinite | ~torch.isfinite(norm)
    scale = scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else None
    factor = None
    if max_norm:
        true_norm = norm / scale if scale is not None else norm
        factor = torch.clamp(max_norm / (true_norm + 1e-6), max=1.0)
    if scale is not None:
        factor = torch.where(skipped, float("nan"), 1.0 if factor is None else factor)
    else:
        optimizer.found_inf = skipped.to(torch.float32)  # read by fused AdamW's step
    if factor is not None:
        for dtype in {g.dtype for g in grads}:
            torch._foreach_mul_([g for g in grads if g.dtype == dtype], factor.to(dtype))
    return skipped
