"""The training recipe's building blocks, one place each (paper appendix A; Gao et al. 2024).

    geometric_median(x)            Weiszfeld iterations from the mean; initialises b_pre and b_router
    normalize_rows_(w)             decoder directions back to unit norm (after init and every step)
    init_tied_(w_enc, w_dec)       random unit decoder rows, encoder rows starting equal to them
    project_out_parallel_grad_(w)  remove each decoder row's gradient component along that row
    default_lr(n_latents)          2e-4 / sqrt(M / 2^14), M the total number of latents
    lr_factor(done, total, decay)  1, then linear decay to 0 over the last `decay` fraction of the budget
    make_optimizer(params, ...)    Adam, fused (one pass over parameters, gradients and moments)
    apply_update(sae, opt, ...)    the step after backward: projection, clip, Adam, renormalisation

The per-step work that touches every parameter is memory-bound and does not shrink with the
number of Switch experts, so it is kept to few passes: the projection is a row dot product (`vecdot`,
2.4x faster than a batched [1, d] x [d, 1] matmul at M 24576, d 768) and one in-place multiply-add, the clip only measures the norm (fused Adam divides the gradients by the
clip factor as it reads them), Adam is one fused kernel, renormalisation one norm and one divide.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
def init_tied_(w_enc: torch.Tensor, w_dec: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Random unit decoder rows; encoder rows start parallel to them (both [..., m, d])."""
    w_dec.copy_(torch.randn(w_dec.shape, generator=generator))
    normalize_rows_(w_dec)
    w_enc.copy_(w_dec)


@torch.no_grad()
def project_out_parallel_grad_(w: torch.Tensor) -> None:
    """w [..., n, d] with unit rows: w.grad -= (w.grad . w_row) w_row for every row, in place.

    What remains only turns each direction; renormalising after the step then changes it by
    second-order amounts, which keeps Adam's statistics meaningful (Gao et al. 2024).
    """
    if w.grad is None:
        return
    dot = torch.linalg.vecdot(w.grad, w.detach()).unsqueeze(-1)  # [..., n, 1], no [.., n, d] temporary
    w.grad.addcmul_(dot, w, value=-1.0)


def default_lr(n_latents: int) -> float:
    """Gao et al.'s 1/sqrt(M) scaling, with M the TOTAL number of latents: 24576 -> 1.63e-4."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def lr_factor(done: float, total: float, decay_frac: float) -> float:
    """Multiplier of the base lr once `done` of a budget of `total` is spent (steps, 0-based, or
    seconds): constant, then linear to 0 over the last decay_frac of the budget."""
    decay = decay_frac * total
    if decay <= 0:
        return 1.0
    return max(0.0, min(1.0, (total - done) / decay))


def make_optimizer(params: list[torch.Tensor], lr: float, betas: tuple[float, float], fused: bool = True
                   ) -> torch.optim.Adam:
    """Adam; `fused` (CPU and CUDA) updates each parameter in one pass instead of several."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused)


@torch.no_grad()
def apply_update(sae: torch.nn.Module, opt: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float,
                 grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] = torch.nn.utils.get_total_norm) -> None:
    """Everything a step does after `loss.backward()`: remove the gradient along each decoder
    direction, clip the global gradient norm to `grad_clip`, take the optimizer step, renormalise
    decoder rows. With a fused Adam the clip costs one read of the gradients (Adam's `grad_scale`,
    the hook GradScaler uses, divides them as it goes), otherwise a read and a rescale. `grad_norm`
    measures the norm of the gradients (the one of the whole SAE when its parameters are sharded)."""
    for w in sae.unit_norm_decoders():
        project_out_parallel_grad_(w)
    grads = [p.grad for p in params if p.grad is not None]
    scale = (grad_norm(grads) / grad_clip).clamp_min(1.0)  # divide the gradients by this
    if opt.defaults.get("fused"):
        opt.grad_scale = scale
        opt.step()
        del opt.grad_scale
    else:
        torch._foreach_div_(grads, scale)
        opt.step()
    for w in sae.unit_norm_decoders():
        normalize_rows_(w.data)
