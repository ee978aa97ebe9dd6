"""Gated SAE (Rajamanoharan et al. 2024a): a gate decides which latents fire, a magnitude path how much.

    x~     = x - b_dec
    pi     = W_gate x~ + b_gate                    [B, M]; gate = 1[pi > 0]
    mag    = ReLU((exp(r_mag) * W_gate) x~ + b_mag)      (magnitudes share W_gate, rescaled per latent)
    f      = gate * mag;  x_hat = W_dec^T f + b_dec
    loss   = ||x - x_hat||^2 + lambda * ||ReLU(pi)||_1 + ||x - (W_dec^T ReLU(pi) + b_dec)_frozen||^2
The last (auxiliary) term uses detached copies of W_dec and b_dec, so it trains only the gate.
Decoder rows are held at unit norm; W_gate starts tied to W_dec, r_mag, b_gate, b_mag at 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from runtime.config import integer, number
from train.recipe import init_tied_
from train.saes.base import (Codes, FromSAELens, Output, SAE, SAELensForm, input_shift, register, saelens_weights,
                             sq_error)
from train.saes.flops import Cost


@register
class GatedSAE(SAE):
    arch = "gated"
    display_name = "Gated"
    size_args = ("width",)
    model_rules = {"width": integer(1), "l1_coeff": number(0)}

    def __init__(self, d: int, width: int, l1_coeff: float | None = None):
        super().__init__(d)
        l1_coeff, = self.defaults(l1_coeff=l1_coeff)
        self.width, self.l1_coeff = width, l1_coeff
        self.W_gate = nn.Parameter(torch.empty(width, d))
        self.b_gate = nn.Parameter(torch.zeros(width))
        self.r_mag = nn.Parameter(torch.zeros(width))
        self.b_mag = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d))
        init_tied_(self.W_gate, self.W_dec)

    @classmethod
    def cost_formula(cls, d: int, *, width: int, sparse_backward: bool = False, dense_decoder: bool = False) -> Cost:
        """M = width (dense codes: both flags are always False). Forward 4dM, train 16dM.

        Inference: the shared gate matmul (x - b_pre) @ W_gate^T 2dM (the magnitude path rescales it
        elementwise) + decoder 2dM. Training also runs the auxiliary reconstruction
        ReLU(pi) @ W_dec.detach(), 2dM, so the module's forward is 6dM. Backward: decoder grad W_dec
        2dM + grad codes 2dM; auxiliary decoder grad of ReLU(pi) only, 2dM (W_dec is detached); gate
        matmul grad W_gate 2dM + grad of x - b_pre 2dM. Total 6dM + 10dM = 16dM.
        Parameters 2Md + 3M + d."""
        m = width
        params = 2 * m * d + 3 * m + d  # W_gate, W_dec [M, d]; b_gate, r_mag, b_mag [M]; b_pre [d]
        forward = 4 * d * m  # gate matmul + decoder
        # + aux reconstruction 2dM; backward: grad W_dec, grad codes, aux grad of ReLU(pi)
        # (W_dec detached: no weight gradient), grad W_gate, grad of x - b_pre
        train = forward + 2 * d * m + 10 * d * m
        return Cost(params=params, forward=float(forward), train=float(train))

    @property
    def n_latents(self) -> int:
        return self.width

    def encoder_directions(self) -> torch.Tensor:
        """The gate's rows W_gate [M, d] (the magnitude path shares them, rescaled per latent)."""
        return self.W_gate

    saelens_architecture = "gated"
    saelens_imports = ("gated",)

    def to_saelens(self) -> SAELensForm:
        """SAELens gated with apply_b_dec_to_input; its W_enc is our gate W_gate, transposed."""
        return SAELensForm("gated", {"apply_b_dec_to_input": True},
                           {"W_enc": self.W_gate.T, "b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag,
                            "W_dec": self.W_dec, "b_dec": self.b_pre})

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens:
        saelens_weights(cfg, tensors, {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"})
        t = tensors
        b_gate, b_mag = t["b_gate"], t["b_mag"]
        if not cfg["apply_b_dec_to_input"]:  # ours gates x - b_pre; the magnitude path scales by e^r_mag
            shift = input_shift(t["W_enc"], t["b_dec"])
            b_gate, b_mag = b_gate + shift, b_mag + shift * t["r_mag"].exp()
        return FromSAELens({"width": cfg["d_sae"]}, {"W_gate": t["W_enc"].T, "b_gate": b_gate, "r_mag": t["r_mag"],
                                                     "b_mag": b_mag, "W_dec": t["W_dec"], "b_pre": t["b_dec"]})

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "width": self.width, "l1_coeff": self.l1_coeff}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    def _pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] -> (gate pre-activations pi, magnitude pre-activations), both [B, M]."""
        gate_in = (x - self.b_pre) @ self.W_gate.T
        return gate_in + self.b_gate, gate_in * self.r_mag.exp() + self.b_mag

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> dense codes [B, M]."""
        pi, mag = self._pre(x)
        return Codes(dense=(pi > 0).to(x.dtype) * torch.relu(mag))

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d]."""
        return codes.dense @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> Output:
        pi, mag = self._pre(x)
        codes = Codes(dense=(pi > 0).to(x.dtype) * torch.relu(mag))
        recon = self.decode(codes)
        mse = sq_error(x, recon)
        gate_act = torch.relu(pi)
        l1 = gate_act.sum(-1).mean()
        aux_recon = gate_act @ self.W_dec.detach() + self.b_pre.detach()
        aux = sq_error(x, aux_recon)
        loss = mse + self.l1_coeff * l1 + aux
        return Output(recon=recon, codes=codes, losses={"loss": loss, "mse": mse, "l1": l1, "aux": aux})
