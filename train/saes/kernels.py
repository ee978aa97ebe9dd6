"""The TopK encoder with conditional compute and a lean backward, and the decoders of TopK-style codes,
shared by `topk` (one expert) and `switch` (N experts).

    vals, idx = topk_encode(xc, W, b, expert, k, sparse)
    xc [B, d] encoder input (x - b_pre); W [N, e, d] encoder rows per expert; b [N, e] or None;
    expert [B] chosen expert per token (None when N = 1); sparse: which backward (below)
    -> vals [B, k] >= 0, idx [B, k] in 0..N*e-1

Forward: the tokens are sorted by expert once and one grouped matmul (`F.grouped_mm`: a real
grouped GEMM on recent CUDA, a C++ loop over segments on CPU) gives every token its own expert's
pre-activations, [B, e] in all, never [B, N*e]; one top-k over them; ReLU.

Backward: only the k selected pre-activations carry gradient. With g [B, k] the gradient of the
values after the ReLU mask, either
  sparse   grad xc = sum_j g[:, j] W[idx[:, j]]     an embedding bag, 2kd per token
           grad W  = S^T xc, S sparse [B, N*e]      one bag of xc rows per latent (`sum_by_latent`), 2kd
  dense    G [B, e] holds g at the selected latents; grad xc = G W_i, grad W_i = G_i^T xc_i
           two grouped matmuls, 4de per token, at matmul speed
The sparse one does fewer FLOPs but reads scattered rows; the dense one runs at the machine's matmul
peak. Both compute in the autocast dtype where autocast is on (like the matmuls they stand for; the
weights are cast once in the forward and the cast kept for the backward). `prefer_sparse` picks by
the ratio e / k: measured with `make bench` at B 8192, d 768, k 32 on a 2-core AMD EPYC
(AVX512-BF16, no AMX), the sparse kernels win at e / k = 24 and 48 in float32 and bfloat16 and tie
at 12 (2026-12-06). A GPU's matmul peak is far above its gather bandwidth, so there the dense ones
are likely the faster at every width (on paper; `kernels=dense` selects them). Either way the bias
gradient is g scattered into the selected latents.

`topk_encode_reference` is the plain autograd path the tests hold both to. `decode_rows` is the
embedding-bag decoder of TopK-style codes (topk, and switch with wide experts), with its own backward
(`RowsDecode`: sampled dot products for the values, bags per latent for the rows); `decode_grouped`
the grouped-matmul one of narrow Switch experts.

Which of them an SAE runs is its `kernels` attribute: "auto" | "sparse" | "dense" | "reference"
(`runs_sparse`).
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

SPARSE_MIN_RATIO = 12  # the sparse backward is used when an expert's width e > SPARSE_MIN_RATIO * k


KERNELS = ("auto", "sparse", "dense", "reference")


def prefer_sparse(expert_width: int, k: int) -> bool:
    """Which backward `topk_encode` should run for experts of this width (module docstring)."""
    return expert_width > SPARSE_MIN_RATIO * k


def runs_sparse(kernels: str, expert_width: int, k: int) -> bool:
    """Whether an SAE with `kernels` = auto | sparse | dense | reference runs the sparse backward."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
    return kernels == "sparse" or (kernels == "auto" and prefer_sparse(expert_width, k))


def topk_relu(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pre [B, m] -> (vals [B, k] >= 0, idx [B, k] int64): the k largest pre-activations, ReLU'd."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of a in G consecutive groups ending at offs [G] (int32):
        a [T, K] x b [G, K, n] -> [T, n]     each row times its group's matrix
        a [m, T] x b [T, n]    -> [G, m, n]  one product per group (a weight gradient)
    `F.grouped_mm` on CUDA (one grouped GEMM kernel); elsewhere, and where CUDA has no kernel for
    the dtypes, one matmul per group written in place (on a 2-core CPU 1.2-3x faster than the
    CPU `F.grouped_mm`, measured at B 8192, d 768, N 16 and 64)."""
    if a.is_cuda and hasattr(F, "grouped_mm"):  # torch >= 2.9
        try:
            return F.grouped_mm(a, b, offs=offs)
        except (RuntimeError, NotImplementedError):
            pass
    ends = offs.tolist()
    bounds = list(zip([0] + ends[:-1], ends, strict=True))
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[2])
        for i, (s, t) in enumerate(bounds):
            if t > s:
                torch.mm(a[s:t], b[i], out=out[s:t])
        return out
    out = a.new_empty(len(ends), a.shape[0], b.shape[1])
    for i, (s, t) in enumerate(bounds):
        torch.mm(a[:, s:t], b[s:t], out=out[i])  # an empty group gives zeros
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for x's device (custom kernels cast by hand), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None,
                k: int, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n_experts, e, d = w.shape
        dt = _compute_dtype(xc)
        w_c = w.to(dt)  # w itself in w's dtype; under autocast one cast, kept for the backward
        if expert is None:  # one expert: no sorting; the bias added by the matmul (a separate add
            order, offs, xs = None, None, xc  # costs a pass over [B, M]: +30% of the step for TopK)
            pre = xc.to(dt) @ w_c[0].T if b is None else torch.addmm(b[0].to(dt), xc.to(dt), w_c[0].T)
        else:
            order = expert.argsort(stable=True)
            offs = torch.bincount(expert, minlength=n_experts).cumsum(0).to(torch.int32)
            xs = xc[order]  # [B, d] grouped by expert
            pre = grouped_mm(xs.to(dt), w_c.transpose(1, 2), offs)  # [B, e]
            if b is not None:
                pre = pre + b[expert[order]].to(pre.dtype)
        vals_s, j_s = topk_relu(pre, k)  # in sorted order, j_s in 0..e-1
        vals_s = vals_s.to(xc.dtype)
        idx_s = j_s if expert is None else j_s + (expert[order] * e)[:, None]
        if order is None:
            vals, idx = vals_s, idx_s
        else:
            vals = torch.empty_like(vals_s).index_copy_(0, order, vals_s)
            idx = torch.empty_like(idx_s).index_copy_(0, order, idx_s)
        ctx.save_for_backward(xc, xs, w_c, idx, vals, order, offs, j_s)
        ctx.sparse, ctx.has_bias, ctx.dt, ctx.w_dtype = sparse, b is not None, dt, w.dtype
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: torch.Tensor, _g_idx: torch.Tensor | None):
        xc, xs, w_c, idx, vals, order, offs, j_s = ctx.saved_tensors
        n_experts, e, d = w_c.shape
        g = torch.where(vals > 0, g_vals, 0.0).to(ctx.w_dtype)  # [B, k]: through the ReLU
        need_xc, need_w, need_b = ctx.needs_input_grad[:3]
        g_xc = g_w = g_b = None
        if ctx.sparse:  # in the compute dtype, like the matmuls they replace
            g_c = g.to(ctx.dt)
            if need_xc:
                g_xc = bag(idx, w_c.reshape(-1, d), g_c).to(xc.dtype)
            if need_w:
                g_w = sum_by_latent(idx.reshape(-1), token_rows(idx), g_c.reshape(-1), xc.to(ctx.dt), n_experts * e)
                g_w = g_w.to(ctx.w_dtype).view(n_experts, e, d)
        else:
            g_s = g if order is None else g[order]
            dense = torch.zeros(len(xc), e, dtype=ctx.dt, device=g.device).scatter_(1, j_s, g_s.to(ctx.dt))  # [B, e]
            if need_xc:
                if order is None:
                    g_xc = (dense @ w_c[0]).to(xc.dtype)
                else:
                    g_xs = grouped_mm(dense, w_c, offs).to(xc.dtype)
                    g_xc = torch.empty_like(g_xs).index_copy_(0, order, g_xs)
            if need_w:
                if order is None:
                    g_w = (dense.T @ xs.to(ctx.dt)).to(ctx.w_dtype)[None]
                else:
                    g_w = grouped_mm(dense.T, xs.to(ctx.dt), offs).to(ctx.w_dtype)
        if ctx.has_bias and need_b:
            g_b = torch.zeros(n_experts * e, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1),
                                                                                       g.reshape(-1)).view(n_experts, e)
        return g_xc, g_w, g_b, None, None, None


class GroupedDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        n_experts, e, d = w.shape
        dt = _compute_dtype(vals)
        order = expert.argsort(stable=True)
        offs = torch.bincount(expert, minlength=n_experts).cumsum(0).to(torch.int32)
        j_s = idx[order] - (expert[order] * e)[:, None]  # [B, k] in 0..e-1
        z = torch.zeros(len(idx), e, dtype=dt, device=vals.device).scatter_(1, j_s, vals[order].to(dt))  # [B, e]
        w_c = w.to(dt)
        out_s = grouped_mm(z, w_c, offs).to(w.dtype)  # [B, d]
        ctx.save_for_backward(z, w_c, order, offs, j_s)
        ctx.w_dtype = w.dtype
        return torch.empty_like(out_s).index_copy_(0, order, out_s)

    @staticmethod
    def backward(ctx, g_out: torch.Tensor):
        z, w_c, order, offs, j_s = ctx.saved_tensors
        g_s = g_out[order].to(z.dtype)  # [B, d] grouped by expert
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:
            g_vals_s = grouped_mm(g_s, w_c.transpose(1, 2), offs).gather(1, j_s).to(ctx.w_dtype)  # [B, k]
            g_vals = torch.empty_like(g_vals_s).index_copy_(0, order, g_vals_s)
        if ctx.needs_input_grad[2]:
            g_w = grouped_mm(z.T, g_s, offs).to(ctx.w_dtype)  # [N, e, d]
        return None, g_vals, g_w, None


class RowsDecode(torch.autograd.Function):
    """out [B, d] = sum_j vals[:, j] w[idx[:, j]] (an embedding bag), with a backward that reads each
    gathered row once per gradient: grad vals = the k sampled dot products `row_dots`, grad w = each
    latent's bag of gradient rows `sum_by_latent` (every row of grad w written once, no zero fill).
    The embedding bag's own backward takes 2-4x longer for both (measured: B 8192, k 32, d 768)."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, vals, w)
        return bag(idx, w, vals.to(w.dtype))

    @staticmethod
    def backward(ctx, g_out: torch.Tensor):
        idx, vals, w = ctx.saved_tensors
        g_out = g_out.to(w.dtype)
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:
            g_vals = row_dots(idx, w, g_out).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            g_w = sum_by_latent(idx.reshape(-1), token_rows(idx), vals.to(w.dtype).reshape(-1), g_out, len(w))
        return None, g_vals, g_w


def bag(idx: torch.Tensor, w: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor | None = None
         ) -> torch.Tensor:
    """F.embedding_bag(mode="sum") of detached tensors, for use inside autograd Functions: given a
    tensor that requires grad, torch runs the variant that also records what its own backward needs
    (1.6x slower at B 8192, k 32, d 768)."""
    return F.embedding_bag(idx, w.detach(), offsets, per_sample_weights=weights.detach(), mode="sum")


def sum_by_latent(latents: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, x: torch.Tensor, n_latents: int
                  ) -> torch.Tensor:
    """out[i] = sum over entries t with latents[t] = i of g[t] x[rows[t]]: latents, rows, g [K], x [n, d]
    -> [n_latents, d].

    The weight gradient of sparse codes (S^T x for the sparse S [n, n_latents] holding g at (rows,
    latents)): the entries sorted by latent make one embedding bag per latent over the rows of x, so
    every output row is written once (an empty bag gives zeros), with no zero-filled buffer and no
    atomic adds; 4x faster than `torch.sparse.mm` on the same entries (B 8192, k 32, d 768, 2-core CPU)."""
    order = latents.argsort()
    starts = torch.zeros(n_latents, dtype=torch.long, device=latents.device)
    starts[1:] = torch.bincount(latents, minlength=n_latents)[:-1].cumsum(0)
    return bag(rows[order], x, g[order], starts)


def token_rows(idx: torch.Tensor) -> torch.Tensor:
    """idx [B, k] -> [B k]: the row of each entry of idx.reshape(-1)."""
    return torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])


def row_dots(idx: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out[b, j] = w[idx[b, j]] . y[b]: idx [B, k], w [m, d], y [B, d] -> [B, k], the product y w^T
    sampled at each row's k entries (`torch.sparse.sampled_addmm`, float32/64; other dtypes are
    computed in float32)."""
    dt = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    B, k = idx.shape
    cols, where = idx.sort(dim=1)  # CSR wants each row's columns in order
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        mask = torch.sparse_csr_tensor(crow, cols.reshape(-1), torch.zeros(B * k, dtype=dt, device=idx.device),
                                       (B, len(w)), check_invariants=False)
    dots = torch.sparse.sampled_addmm(mask, y.detach().to(dt), w.detach().to(dt).T, beta=0.0).values().view(B, k)
    return torch.empty_like(dots).scatter_(1, where, dots)


def row_offsets(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [K] ascending in 0..n_rows-1 -> (counts [n_rows], offsets [n_rows]: where each row's entries
    start), the offsets an embedding bag over the K entries takes."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts, counts.cumsum(0) - counts


def decode_rows(idx: torch.Tensor, vals: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * w_dec[idx[b, j]]: idx, vals [B, k], w_dec [m, d] -> [B, d].

    An embedding bag: the [B, k, d] gathered rows are never materialised, forward or backward
    (10x faster than gather + einsum for B=4096, k=32, d=576 on a 2-core CPU, measured)."""
    return RowsDecode.apply(idx, vals, w_dec)


def decode_grouped(idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * W[idx[b, j]] for Switch codes, idx, vals [B, k], W [N, e, d], expert [B] -> [B, d],
    as each expert's dense codes [n_i, e] times its decoder [e, d]: 2de FLOPs per token forward, 4de
    backward, at matmul speed and with no zero-filled gradient, against the embedding bag's 2kd
    and 4kd of scattered row reads. The choice between them follows `prefer_sparse`."""
    return GroupedDecode.apply(idx, vals, w, expert)


def topk_encode(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None,
                k: int, sparse: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path (module docstring); sparse=None picks the backward by `prefer_sparse`."""
    if sparse is None:
        sparse = prefer_sparse(w.shape[1], k)
    return TopKEncode.apply(xc, w, b, expert, k, sparse)


def topk_encode_reference(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values, plain autograd: a loop over experts, dense per-expert pre-activations, dense backward."""
    if expert is None:
        pre = xc @ w[0].T
        return topk_relu(pre if b is None else pre + b[0], k)
    vals = xc.new_zeros(len(xc), k)
    idx = torch.empty(len(xc), k, dtype=torch.long, device=xc.device)
    for i in range(w.shape[0]):
        rows = (expert == i).nonzero().squeeze(1)
        if len(rows):
            pre = xc[rows] @ w[i].T
            v, j = topk_relu(pre if b is None else pre + b[i], k)
            vals = vals.index_put((rows,), v.to(vals.dtype))
            idx[rows] = j + i * w.shape[1]
    return vals, idx
