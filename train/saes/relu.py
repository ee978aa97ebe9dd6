"""ReLU SAE with an L1 penalty, as in Anthropic's April 2024 update ("Circuits Updates").

    f     = ReLU(W_enc x + b_enc)                 [B, M]  (no pre-encoder bias subtraction)
    x_hat = W_dec^T f + b_dec                      (b_dec is the base class's b_pre)
    loss  = ||x - x_hat||^2 + lambda_t * sum_i f_i ||W_dec,i||
The decoder norm is free (it sits inside the penalty); lambda_t rises linearly from 0 to
`l1_coeff` over the first `warmup_frac` of the steps. Decoder rows start at norm 0.1 with the
encoder tied to them, b_enc = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from runtime.config import integer, number
from train.recipe import normalize_rows_
from train.saes.base import (Codes, FromSAELens, Output, SAE, SAELensForm, input_shift, register, saelens_weights,
                             sq_error)
from train.saes.flops import Cost


@register
class ReLUSAE(SAE):
    arch = "relu"
    display_name = "ReLU"
    size_args = ("width",)
    model_rules = {"width": integer(1), "l1_coeff": number(0), "warmup_frac": number(0, 1)}

    def __init__(self, d: int, width: int, l1_coeff: float | None = None, warmup_frac: float | None = None):
        super().__init__(d)
        l1_coeff, warmup_frac = self.defaults(l1_coeff=l1_coeff, warmup_frac=warmup_frac)
        self.width, self.l1_coeff, self.warmup_frac = width, l1_coeff, warmup_frac
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.randn(width, d))
        with torch.no_grad():
            normalize_rows_(self.W_dec)
            self.W_dec.mul_(0.1)
            self.W_enc.copy_(self.W_dec)
        self.register_buffer("l1_now", torch.tensor(l1_coeff))

    @classmethod
    def cost_formula(cls, d: int, *, width: int, sparse_backward: bool = False, dense_decoder: bool = False) -> Cost:
        """M = width (dense codes: both flags are always False). Forward 4dM, train 10dM.

        Encoder x @ W_enc^T 2dM and decoder codes @ W_dec 2dM, both dense. Backward: decoder grad
        W_dec 2dM + grad codes 2dM; encoder grad W_enc 2dM only. There is no input-gradient matmul,
        because x has no trainable bias subtracted (so not 3 x forward = 12dM but 10dM).
        Parameters 2Md + M + d."""
        m = width
        params = 2 * m * d + m + d  # W_enc, W_dec [M, d]; b_enc [M]; b_pre [d]
        forward = 4 * d * m  # encoder + decoder, dense
        train = forward + 6 * d * m  # grad W_dec, grad codes, grad W_enc (no input gradient)
        return Cost(params=params, forward=float(forward), train=float(train))

    @property
    def n_latents(self) -> int:
        return self.width

    saelens_architecture = "standard"
    saelens_imports = ("standard",)

    def to_saelens(self) -> SAELensForm:
        """SAELens standard without apply_b_dec_to_input (ours encodes x itself)."""
        return SAELensForm("standard", {"apply_b_dec_to_input": False},
                           {"W_enc": self.W_enc.T, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_pre})

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens:
        saelens_weights(cfg, tensors, {"W_enc", "b_enc", "W_dec", "b_dec"})
        b_enc = tensors["b_enc"]
        if cfg["apply_b_dec_to_input"]:  # ours encodes x itself
            b_enc = b_enc - input_shift(tensors["W_enc"], tensors["b_dec"])
        return FromSAELens({"width": cfg["d_sae"]}, {"W_enc": tensors["W_enc"].T, "b_enc": b_enc,
                                                     "W_dec": tensors["W_dec"], "b_pre": tensors["b_dec"]})

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "width": self.width, "l1_coeff": self.l1_coeff, "warmup_frac": self.warmup_frac}

    def schedule(self, done: float, total: float) -> None:
        ramp = self.warmup_frac * total
        self.l1_now.fill_(self.l1_coeff * (min(1.0, done / ramp) if ramp > 0 else 1.0))

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> dense codes [B, M]."""
        return Codes(dense=torch.relu(x @ self.W_enc.T + self.b_enc))

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d]."""
        return codes.dense @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> Output:
        codes = self.encode(x)
        recon = self.decode(codes)
        mse = sq_error(x, recon)
        l1 = (codes.dense * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return Output(recon=recon, codes=codes, losses={"loss": mse + self.l1_now * l1, "mse": mse, "l1": l1})
