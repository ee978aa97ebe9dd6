"""TopK SAE (Gao et al. 2024): z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from train.recipe import normalize_rows_
from train.saes.base import SAE, Codes, Output, register, sq_error
from train.saes.kernels import runs_sparse, topk_encode, topk_encode_reference


def decode_rows(idx: torch.Tensor, vals: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * w_dec[idx[b, j]]: idx, vals [B, k], w_dec [m, d] -> [B, d].

    An embedding bag: the [B, k, d] gathered rows are never materialised, forward or backward
    (10x faster than gather + einsum for B=4096, k=32, d=576 on a 2-core CPU, measured)."""
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals.to(w_dec.dtype), mode="sum")


def init_tied_(w_enc: torch.Tensor, w_dec: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Random unit decoder rows; encoder rows start parallel to them (both [..., m, d])."""
    with torch.no_grad():
        w_dec.copy_(torch.randn(w_dec.shape, generator=generator))
        normalize_rows_(w_dec)
        w_enc.copy_(w_dec)


@register
class TopKSAE(SAE):
    arch = "topk"

    def __init__(self, d: int, width: int, k: int):
        super().__init__(d)
        if not 0 < k <= width:
            raise ValueError(f"k={k} must be between 1 and the width {width}")
        self.width, self.k = width, k
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d))
        init_tied_(self.W_enc, self.W_dec)

    @property
    def n_latents(self) -> int:
        return self.width

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "width": self.width, "k": self.k}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    @property
    def sparse_backward(self) -> bool:
        return runs_sparse(self.backward, self.width, self.k)

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> idx, vals [B, k] (the encoder's backward set by `self.backward`)."""
        args = (x - self.b_pre, self.W_enc[None], self.b_enc[None], None, self.k)
        sparse = self.sparse_backward
        vals, idx = topk_encode_reference(*args) if self.backward == "reference" else topk_encode(*args, sparse)
        return Codes(idx=idx, vals=vals)

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d]."""
        return decode_rows(codes.idx, codes.vals, self.W_dec) + self.b_pre

    def forward(self, x: torch.Tensor) -> Output:
        codes = self.encode(x)
        recon = self.decode(codes)
        mse = sq_error(x, recon)
        return Output(recon=recon, codes=codes, losses={"loss": mse, "mse": mse})
