"""The TopK encoder with a sparse backward, shared by `topk` (one expert) and `switch` (N experts).

    vals, idx = topk_encode(xc, W, b, expert, k)
    xc [B, d] encoder input (x - b_pre); W [N, e, d] encoder rows per expert; b [N, e] or None;
    expert [B] chosen expert per token (None when N = 1); -> vals [B, k] >= 0, idx [B, k] in 0..N*e-1

Forward: each expert's pre-activations for its own tokens only ([n_i, e], never [B, N*e]), top-k,
ReLU. Backward: only the k selected pre-activations carry gradient, so with g [B, k] the gradient
of the values after the ReLU mask,

    grad xc = sum_j g[:, j] W[idx[:, j]]      an embedding bag: 2kd per token, no [B, k, d] tensor
    grad W  = S^T xc, S = sparse [B, N*e] holding g at idx   a sparse matmul: 2kd per token
    grad b  = g scattered into the selected latents

instead of the dense 4de per token (4dM for TopK). `topk_encode_reference` is the plain autograd
version that the tests hold the fast one to.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def topk_relu(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pre [B, m] -> (vals [B, k] >= 0, idx [B, k] int64): the k largest pre-activations, ReLU'd."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


def _pre_topk(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """xc [n, d], w [e, d], b [e] | None -> (vals [n, k] after ReLU, idx [n, k] in 0..e-1)."""
    pre = xc @ w.T
    return topk_relu(pre if b is None else pre + b, k)


def groups(expert: torch.Tensor, n_experts: int) -> list[tuple[int, torch.Tensor]]:
    """(expert i, the rows routed to it) for every expert with at least one token, from one sort."""
    order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=n_experts).tolist()
    return [(i, rows) for i, rows in enumerate(order.split(counts)) if len(rows)]


class TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_experts, e, _ = w.shape
        if expert is None:
            vals, idx = _pre_topk(xc, w[0], None if b is None else b[0], k)
        else:
            vals = xc.new_empty(len(xc), k)
            idx = torch.empty(len(xc), k, dtype=torch.long, device=xc.device)
            for i, rows in groups(expert, n_experts):
                v, j = _pre_topk(xc[rows], w[i], None if b is None else b[i], k)
                vals[rows], idx[rows] = v.to(vals.dtype), j + i * e  # (v is bf16 under autocast)
        ctx.save_for_backward(xc, w, idx, vals)
        ctx.has_bias = b is not None
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: torch.Tensor, _g_idx: torch.Tensor | None):
        xc, w, idx, vals = ctx.saved_tensors
        n_experts, e, d = w.shape
        g = torch.where(vals > 0, g_vals, 0.0).to(w.dtype)  # [B, k]: through the ReLU
        w_flat = w.reshape(-1, d)
        g_xc = F.embedding_bag(idx, w_flat, per_sample_weights=g, mode="sum") if ctx.needs_input_grad[0] else None
        g_w = g_b = None
        if ctx.needs_input_grad[1]:
            rows = torch.arange(len(xc), device=xc.device).repeat_interleave(idx.shape[1])
            s = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), g.reshape(-1), (n_experts * e, len(xc)),
                                        check_invariants=False)
            g_w = torch.sparse.mm(s, xc.to(w.dtype)).view(n_experts, e, d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = torch.zeros(n_experts * e, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1),
                                                                                       g.reshape(-1)).view(n_experts, e)
        return g_xc, g_w, g_b, None, None


def topk_encode(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path (module docstring)."""
    return TopKEncode.apply(xc, w, b, expert, k)


def topk_encode_reference(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values, plain autograd: dense per-expert pre-activations, dense backward."""
    if expert is None:
        return _pre_topk(xc, w[0], None if b is None else b[0], k)
    vals = xc.new_zeros(len(xc), k)
    idx = torch.empty(len(xc), k, dtype=torch.long, device=xc.device)
    for i, rows in groups(expert, w.shape[0]):
        v, j = _pre_topk(xc[rows], w[i], None if b is None else b[i], k)
        vals = vals.index_put((rows,), v.to(vals.dtype))
        idx[rows] = j + i * w.shape[1]
    return vals, idx
