"""BatchTopK SAE (Bussmann, Leask and Nanda 2024, "BatchTopK Sparse Autoencoders").

    a     = ReLU(W_enc (x - b_pre) + b_enc)                          [B, M]
    train:     z = the B*k largest entries of a over the WHOLE batch, every other entry 0
    inference: z_i = a_i if a_i > theta else 0                       (one global threshold)
    x_hat = W_dec^T z + b_pre;  loss = ||x - x_hat||^2 summed over d, mean over tokens (base.sq_error)

Training keeps k active latents per token on average, not per token: a token the dictionary finds
hard gets more latents, an easy one fewer (or none). The selection depends on the rest of the batch,
so at inference, where tokens come one by one, it is replaced by a threshold: `self.training`
decides which rule `encode` applies (`sae.eval()` for the inference rule: `train.saes.load` returns
the module in eval mode and the validation during training switches to it, so eval, geometry,
dashboards, autointerp and the validation curves all read the inference rule).

theta is estimated as the paper says, from the smallest activation the batch rule kept (the smallest
positive one) in each training step's batch, m_n at step n, averaged over steps:
    theta_n = theta_{n-1} + w_n (m_n - theta_{n-1}),   w_n = (1 - c) / (1 - c^n),   c = `theta_decay`
c = 1 (w_n = 1/n) is the paper's plain mean over every step; c < 1 is a bias-corrected exponential
moving average, a mean over about the last 1/(1 - c) steps (theta_1 = m_1, and while n << 1/(1 - c)
nearly the plain mean). The default 0.9 follows the encoder as it trains, which matters on runs of a
few hundred steps: at `make variants`' BatchTopK (width 2048, k 32, 191 steps of 2048 tokens on the
demo store) the held-out L0 at inference ends at 32.0 with c = 0.9 against 25.4 with c = 0.99, whose
theta (10.75) still trailed the encoder's (10.06 gives k per token on held-out rows); the batch's
smallest kept value is an order statistic of B*k values, so averaging over ~10 steps costs little
noise. On the synthetic store of tests/train/test_loop.py (width 64, k 4, 800 steps) the plain mean
ends about 23% above the final encoder's mean smallest kept activation and gives 3.6 active latents
per token at inference. theta and its step count n are buffers (`theta`,
`theta_steps`), so `base.save`/`load` and checkpoints carry them and a resumed run continues the
same average. They change in training steps only: `forward` with the module in training mode and
autograd on (the loop's step); `encode` alone, `torch.no_grad()` and eval mode leave them alone.
With several data-parallel ranks (train/dist.py sets `global_mean`) m_n is the mean over ranks of
each rank's smallest kept activation, so every rank holds the same theta. Before the first step
theta is 0, and the inference rule is then a plain ReLU.

Codes are TopK-style, idx and vals [B, kmax], kmax the largest number of latents any token of the
batch has, rows padded with index 0 and value 0 (`Codes.active` is vals > 0). The selection is a
top-k over the batch's [B*M] pre-activations (`batch_topk`; never a second [B, M] tensor: ReLU is applied to the
B*k kept values; the inference rule thresholds the pre-activations in place). Training decodes the
B*k kept values as one embedding bag (exactly 2kd FLOPs per token); `decode` packs the non-zero codes
the same way.

Encoder backward (`kernels`, as for TopK): only the B*k kept pre-activations carry gradient, so
"sparse" computes grad (x - b_pre) as an embedding bag of the kept W_enc rows and grad W_enc as one
bag of xc rows per latent (`kernels.sum_by_latent`), 2kd each per token; "dense" scatters the kept
gradients into [B, M] and runs two dense matmuls, 4dM per token; "auto" picks by width / k
(kernels.prefer_sparse); "reference" is plain autograd through torch.topk (dense). The TopK kernel of
train/saes/kernels.py selects per row inside its forward, so it cannot be reused for a batch-wide
selection: `_BatchTopK` below is the same two embedding bags around the batch-wide top-k, held to
plain autograd by tests/train/test_batchtopk.py.

Deviations, stated: with several data-parallel ranks each rank selects the top (B/R)*k of its own
B/R tokens (not the top B*k of the global batch); theta is by default a moving average rather than
the paper's plain mean (`theta_decay=1` gives the plain mean).

Selection speed: `batch_topk` takes each row's top 4k first and the batch's B*k largest among those,
exact unless a row holds more than 4k of them (then one top-k over all B*M values runs instead).
Measured at B 8192, M 24576, k 32 (bench/train_step.py): a training step 2.1 s against 5.1 s with the
single top-k over the 201M values, TopK's 1.9 s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from runtime.config import FLAG, integer, number
from train.recipe import init_tied_
from train.saes.auxk import auxk_losses
from train.saes.base import (Codes, FromSAELens, Layout, Output, SAE, SAELensForm, register, saelens_weights, sq_error)
from train.saes.flops import Cost
from train.saes.kernels import bag, row_offsets, runs_sparse, sum_by_latent
from train.saes.topk import TopKSAE


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for x's device, else x's (the custom function casts by hand)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


CANDIDATES_PER_K = 4  # `batch_topk` first keeps each row's top CANDIDATES_PER_K * k


def batch_topk(pre: torch.Tensor, n_keep: int, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_keep largest entries of pre [B, M] over the whole batch: (values [n_keep], flat indices
    row * M + latent [n_keep]), unordered; exactly what pre.view(-1).topk(n_keep) selects (up to ties).

    Each row's top `per_row` are taken first (a per-row top-k, the cheap one TopK runs), then the
    n_keep largest of those B * per_row candidates. That is exact unless some row has more than
    per_row entries above the resulting cut, i.e. its smallest candidate is above the cut: then the
    selection is run again over all B * M values (one host synchronisation decides)."""
    n, m = pre.shape
    c = min(m, per_row)
    if c == m or n * c <= n_keep:
        return pre.view(-1).topk(n_keep, sorted=False)
    cand_vals, cand_idx = pre.topk(c, dim=1, sorted=False)  # [B, c]
    vals, pos = cand_vals.view(-1).topk(n_keep, sorted=False)
    if bool((cand_vals.amin(dim=1) > vals.amin()).any()):  # a row may hold more above the cut than c
        return pre.view(-1).topk(n_keep, sorted=False)
    return vals, pos.div(c, rounding_mode="floor") * m + cand_idx.view(-1)[pos]


class _BatchTopK(torch.autograd.Function):
    """xc [B, d], w [M, d], b [M] -> (vals [K] >= 0, flat [K] int64 = row * M + latent, ascending):
    the K largest of xc @ w^T + b over the whole batch, ReLU'd; backward sparse or dense (module doc)."""

    @staticmethod
    def forward(ctx, xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor, n_keep: int, sparse: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dt = _compute_dtype(xc)
        pre = torch.addmm(b.to(dt), xc.to(dt), w.to(dt).T)  # [B, M], the only one
        vals, flat = batch_topk(pre, n_keep, CANDIDATES_PER_K * -(-n_keep // len(xc)))
        del pre
        flat, order = flat.sort()
        vals = vals[order].relu().to(xc.dtype)
        ctx.save_for_backward(xc, w, vals, flat)
        ctx.sparse, ctx.dt = sparse, dt
        ctx.mark_non_differentiable(flat)
        return vals, flat

    @staticmethod
    def backward(ctx, g_vals: torch.Tensor, _g_flat: torch.Tensor | None):
        xc, w, vals, flat = ctx.saved_tensors
        n, m = len(xc), w.shape[0]
        g = torch.where(vals > 0, g_vals, 0.0).to(w.dtype)  # [K], through the ReLU
        rows, cols = flat // m, flat % m
        need_xc, need_w, need_b = ctx.needs_input_grad[:3]
        g_xc = g_w = g_b = None
        if ctx.sparse:
            if need_xc:  # sum over each row's kept latents of g * W_enc[latent]: an embedding bag
                g_xc = bag(cols, w, g, row_offsets(rows, n)[1])
            if need_w:  # S^T xc with S [B, M] holding g at the kept entries
                g_w = sum_by_latent(cols, rows, g, xc.detach().to(w.dtype), m)
        else:
            dense = torch.zeros(n * m, dtype=ctx.dt, device=g.device).index_put_((flat,), g.to(ctx.dt)).view(n, m)
            if need_xc:
                g_xc = (dense @ w.to(ctx.dt)).to(w.dtype)
            if need_w:
                g_w = (dense.T @ xc.to(ctx.dt)).to(w.dtype)
        if need_b:
            g_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return g_xc, g_w, g_b, None, None


@register
class BatchTopKSAE(SAE):
    arch = "batchtopk"
    display_name = "BatchTopK"
    size_args = ("width", "k")
    sparse_codes = True
    model_rules = {"width": integer(1), "k": integer(1), "theta_decay": number(0, 1), "aux_k": integer(0),
                   "aux_coeff": number(0), "skip": FLAG}
    # set by train.dist.DataParallel with several ranks: the mean over ranks of a per-rank statistic
    global_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    transcodes = True

    def __init__(self, d: int, width: int, k: int, theta_decay: float | None = None, aux_k: int | None = None,
                 aux_coeff: float | None = None, transcoder: bool = False, skip: bool | None = None):
        theta_decay, aux_k, aux_coeff, skip = self.defaults(theta_decay=theta_decay, aux_k=aux_k, aux_coeff=aux_coeff,
                                                            skip=skip)
        super().__init__(d, transcoder, skip)
        if not 0 < k <= width:
            raise ValueError(f"k={k} must be between 1 and the width {width}")
        if not 0 <= theta_decay <= 1:
            raise ValueError(f"theta_decay={theta_decay} must be in [0, 1]")
        self.width, self.k, self.theta_decay = width, k, theta_decay
        self.aux_k, self.aux_coeff = aux_k, aux_coeff  # AuxK (train/saes/auxk.py); 0 = off
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d))
        init_tied_(self.W_enc, self.W_dec)
        self.register_buffer("theta", torch.zeros(()))  # the inference threshold
        self.register_buffer("theta_steps", torch.zeros((), dtype=torch.long))  # training steps averaged into it

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        super().check_model(model)
        if model["k"] > model["width"]:
            raise ValueError(f"model.k={model['k']} is larger than model.width={model['width']}")

    @classmethod
    def cost_formula(cls, d: int, *, width: int, k: int, sparse_backward: bool = False,
                     dense_decoder: bool = False) -> Cost:
        """M = width, k the mean number of active latents per token. Forward 2dM + 2kd; train
        6dM + 6kd (dense backward), 2dM + 10kd (sparse): TopK's counts, because per token on
        average the same work is done.

        Forward: encoder (x - b_pre) @ W_enc^T, 2dM (the batch-wide top-k and the threshold are
        selections, not counted); decoder, one embedding bag of the B*k kept W_dec rows, 2kd per
        token (exactly B*k rows in training; at inference the rows above theta, k per token on
        average when theta is calibrated). Backward: decoder, grad of the kept values 2kd + grad of
        the kept W_dec rows 2kd; encoder, grad W_enc 2dM + grad of (x - b_pre) 2dM dense, or only
        the B*k kept rows of each, 2kd + 2kd, with the sparse backward. The input gradient is
        computed because b_pre is trained. Parameters 2Md + M + d (theta and its step count are
        buffers, not trained)."""
        return TopKSAE.cost_formula(d, width=width, k=k, sparse_backward=sparse_backward,
                                    dense_decoder=dense_decoder)

    @property
    def n_latents(self) -> int:
        return self.width

    def layout(self) -> Layout:
        return Layout(self.d, self.width, self.k)

    saelens_architecture = "jumprelu"
    saelens_imports = ("jumprelu",)

    def to_saelens(self) -> SAELensForm:
        """Its inference rule pre 1[pre > max(theta, 0)], pre = W_enc (x - b_pre) + b_enc, is SAELens's
        jumprelu with apply_b_dec_to_input and every threshold max(theta, 0)."""
        threshold = self.theta.clamp_min(0).expand(self.width)
        return SAELensForm("jumprelu", {"apply_b_dec_to_input": True},
                           {"W_enc": self.W_enc.T, "b_enc": self.b_enc, "threshold": threshold, "W_dec": self.W_dec,
                            "b_dec": self.b_pre})

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens | None:
        """Only a folder we exported from a BatchTopK run (its metadata says so, b_dec is subtracted and every
        threshold is the same); k, a training mean, comes from the metadata."""
        saelens_weights(cfg, tensors, {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"})
        threshold = tensors["threshold"].clamp_min(0)
        same = bool((threshold == threshold[0]).all())
        if ours.get("arch") != cls.arch or not cfg["apply_b_dec_to_input"] or not same:
            return None
        t = tensors
        return FromSAELens({"width": cfg["d_sae"]}, {"W_enc": t["W_enc"].T, "b_enc": t["b_enc"], "W_dec": t["W_dec"],
                                                     "b_pre": t["b_dec"], "theta": threshold[0].clone()})

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "width": self.width, "k": self.k, "theta_decay": self.theta_decay,
                "aux_k": self.aux_k, "aux_coeff": self.aux_coeff, **self.transcoder_config()}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    @property
    def sparse_backward(self) -> bool:
        return runs_sparse(self.kernels, self.width, self.k)

    # ------------------------------------------------------------------------------- the two rules

    def _kept(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [F], latents [F], values [F]) of the codes of x [B, d], ordered by row then latent:
        the batch rule in training mode (F = B*k, values >= 0), the threshold rule otherwise (F the
        number of activations above theta)."""
        xc = self.centred(x)
        m = self.width
        if self.training:
            n_keep = len(x) * self.k
            if self.kernels == "reference":
                pre = torch.addmm(self.b_enc, xc, self.W_enc.T)
                vals, flat = pre.view(-1).topk(n_keep, sorted=False)
                flat, order = flat.sort()
                vals = vals[order].relu()
            else:
                vals, flat = _BatchTopK.apply(xc, self.W_enc, self.b_enc, n_keep, self.sparse_backward)
            return flat // m, flat % m, vals
        pre = torch.addmm(self.b_enc, xc, self.W_enc.T)
        pre = F.threshold(pre, max(self.theta.item(), 0.0), 0.0, inplace=True)  # a if a > theta else 0
        rows, cols = pre.nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols].to(x.dtype)

    @torch.no_grad()
    def _update_theta(self, vals: torch.Tensor) -> None:
        """One training step's smallest kept (positive) activation m into theta (module docstring);
        a batch with none leaves theta as it is. No host synchronisation."""
        smallest = torch.where(vals > 0, vals, torch.inf).amin().float()
        seen = torch.isfinite(smallest)
        smallest = torch.where(seen, smallest, self.theta)
        if self.global_mean is not None:  # the same value on every rank
            smallest = self.global_mean(smallest)
            seen = torch.ones_like(seen)
        n = self.theta_steps + seen.long()
        c = self.theta_decay
        if c == 1:
            w = 1.0 / n.clamp_min(1).double()
        else:  # (1 - c) / (1 - c^n), in float64 so that c just below 1 stays below 1
            w = (1 - c) / (1 - torch.pow(torch.tensor(c, dtype=torch.float64, device=n.device), n.clamp_min(1)))
        self.theta.add_(torch.where(seen, (smallest - self.theta) * w.float(), 0.0))
        self.theta_steps.copy_(n)

    @staticmethod
    def _pad(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int) -> Codes:
        """Row-ordered (rows, latents, values) [F] -> Codes idx, vals [n_rows, kmax], padded with (0, 0)."""
        counts, starts = row_offsets(rows, n_rows)
        kmax = int(counts.max()) if n_rows else 0
        slot = torch.arange(len(rows), device=rows.device) - starts[rows]
        idx = torch.zeros(n_rows, kmax, dtype=torch.long, device=rows.device).index_put_((rows, slot), cols)
        padded = vals.new_zeros(n_rows, kmax).index_put((rows, slot), vals)
        return Codes(idx=idx, vals=padded)

    def _decode_kept(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int) -> torch.Tensor:
        """sum over each row's codes of value * W_dec[latent], + b_pre: one embedding bag, 2d per code."""
        summed = F.embedding_bag(cols, self.W_dec, row_offsets(rows, n_rows)[1], mode="sum",
                                 per_sample_weights=vals.to(self.W_dec.dtype))
        return summed + self.b_pre

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> idx, vals [B, kmax]: the batch rule in training mode, the threshold in eval mode."""
        rows, cols, vals = self._kept(x)
        return self._pad(rows, cols, vals, len(x))

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d], from the non-zero codes only (the padding costs nothing)."""
        rows, slot = (codes.vals != 0).nonzero(as_tuple=True)
        return self._decode_kept(rows, codes.idx[rows, slot], codes.vals[rows, slot], len(codes.vals))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Output:
        """x [B, d] -> its reconstruction, or a transcoder's of `target` [B, d], with the losses."""
        rows, cols, vals = self._kept(x)
        if self.training and torch.is_grad_enabled():
            self._update_theta(vals.detach())
        recon = self.skipped(x, self._decode_kept(rows, cols, vals, len(x)))
        mse = sq_error(x if target is None else target, recon)
        return Output(recon=recon, codes=self._pad(rows, cols, vals, len(x)),
                      losses=auxk_losses(self, x, recon, mse, target))
