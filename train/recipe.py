"""The training recipe's building blocks, one place each (paper appendix A; Gao et al. 2024).

    geometric_median(x)            Weiszfeld iterations from the mean; initialises b_pre and b_router
    normalize_rows_(w)             decoder directions back to unit norm (after init and every step)
    project_out_parallel_grad_(w)  remove each decoder row's gradient component along that row
    default_lr(n_latents)          2e-4 / sqrt(M / 2^14), M the total number of latents
    lr_factor(step, steps, decay)  1, then linear decay to 0 over the last `decay` fraction of steps
    apply_update(sae, opt, ...)    the step after backward: projection, clip, Adam, renormalisation
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """argmin_y sum_i ||x_i - y||, x [n, d] -> [d], by Weiszfeld's algorithm started at the mean."""
    x = x.double()
    y = x.mean(dim=0)
    for _ in range(iters):
        dist = (x - y).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        y_next = (w[:, None] * x).sum(dim=0) / w.sum()
        if (y_next - y).norm() <= tol * max(1.0, y.norm().item()):
            y = y_next
            break
        y = y_next
    return y.float()


@torch.no_grad()
def normalize_rows_(w: torch.Tensor) -> None:
    """w [..., n, d]: every row (a decoder direction) scaled to unit norm, in place."""
    w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def project_out_parallel_grad_(w: torch.Tensor) -> None:
    """w [..., n, d] with unit rows: w.grad -= (w.grad . w_row) w_row for every row, in place.

    What remains only turns each direction; renormalising after the step then changes it by
    second-order amounts, which keeps Adam's statistics meaningful (Gao et al. 2024).
    """
    if w.grad is None:
        return
    w.grad.sub_((w.grad * w).sum(dim=-1, keepdim=True) * w)


def default_lr(n_latents: int) -> float:
    """Gao et al.'s 1/sqrt(M) scaling, with M the TOTAL number of latents: 24576 -> 1.63e-4."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def lr_factor(step: int, steps: int, decay_frac: float = 0.2) -> float:
    """Multiplier of the base lr at `step` (0-based): constant, then linear to 0 at `steps`."""
    decay_steps = decay_frac * steps
    if decay_steps <= 0:
        return 1.0
    return max(0.0, min(1.0, (steps - step) / decay_steps))


def apply_update(sae: torch.nn.Module, opt: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float) -> None:
    """Everything a step does after `loss.backward()`: remove the gradient along each decoder
    direction, clip the global gradient norm, take the optimizer step, renormalise decoder rows."""
    for w in sae.unit_norm_decoders():
        project_out_parallel_grad_(w)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    for w in sae.unit_norm_decoders():
        normalize_rows_(w.data)
