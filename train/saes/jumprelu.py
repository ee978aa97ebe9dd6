"""JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping Ahead"): a learned threshold per latent and an
L0 penalty, both trained through straight-through estimators (STEs).

    pre   = W_enc x + b_enc                              [B, M]  (x as it is: no b_dec subtracted)
    theta = exp(log_theta)                               [M]     (a positive threshold per latent)
    f     = JumpReLU_theta(pre) = pre * H(pre - theta)   [B, M]  (H: the Heaviside step, H(0) = 0)
    x_hat = W_dec^T f + b_dec                            [B, d]  (b_dec is the base class's b_pre)
    L0    = sum_i H(pre_i - theta_i), averaged over the B tokens
    loss  = ||x - x_hat||^2 + lambda_t * s^2 * L0        (s: the input scale, see "Units" below)

H has derivative zero almost everywhere, so theta would never learn. The paper replaces the
derivatives with respect to theta by kernel density estimates (its pseudo-derivatives), with the
rectangle kernel K(u) = 1 for |u| < 1/2, else 0, and a bandwidth eps:

    d/dtheta JumpReLU_theta(z) := -(theta / eps) K((z - theta) / eps)
    d/dtheta H(z - theta)      := -(1 / eps)     K((z - theta) / eps)

With respect to z, JumpReLU keeps its ordinary derivative H(z - theta), and H gets 0: the L0 term
trains only the thresholds, never the encoder. So only tokens whose pre-activation lies within eps/2
of a latent's threshold move that threshold: L0 pushes it up, the reconstruction (through JumpReLU)
pushes it down where the latent's output helps. `JumpReLU` and `Step` below are the two autograd
functions.

Choices (each a reading of the paper, or a deviation from it, stated):
* **No b_dec subtraction before the encoder**, as in the paper's definition of the SAE,
  f(x) = sigma(W_enc x + b_enc), and in Gemma Scope (the Gated SAE before it subtracted b_dec). The
  training step then needs no gradient with respect to the input (see `cost_formula`).
* **Units.** The paper trains on activations divided by one fixed scalar so that their mean squared
  norm is 1, and states theta_0, eps and lambda in those units. Our loader does not rescale
  (train/loader.py), and store norms differ widely (a few tens on the tests' synthetic stores, ~240
  on the demo's). So `init_from_batch` measures s = sqrt(mean_b ||x_b||^2) on the first training
  batch (the `scale` buffer, saved with the weights) and the module uses theta_0 * s, eps * s and
  lambda * s^2. Training on x is then exactly the paper's problem on x / s, with the loss multiplied
  by s^2 (b_enc and theta carry a factor s, the decoder directions and the codes' support are the
  same), so the YAML's values mean the same on every store. An SAE built without
  `init_from_batch` has s = 1.
* **Decoder rows held at unit norm** (`unit_norm_decoders`: the recipe removes each row's gradient
  component along the row before the step and renormalises after it, as for TopK and Gated). The L0
  penalty does not depend on decoder norms; the constraint only removes the symmetry that scales a
  decoder row up and its encoder row, b_enc entry and threshold down.
* **Init**: random unit decoder rows, encoder rows equal to them, b_enc = 0, theta = theta_0 * s
  for every latent, b_dec at the geometric median of the first batch (the recipe's, for every SAE).
* lambda_t rises linearly from 0 to `l0_coeff` over the first `warmup_frac` of the run (`schedule`),
  as the paper's follow-up Gemma Scope warms up its sparsity coefficient.
* **Defaults** (conf/train/model/jumprelu.yaml) are not the paper's theta_0 = eps = 0.001: Adam moves
  log(theta) by about lr per step, so short runs keep nearly their initial thresholds, and at 0.001
  a 200-step demo-scale run stays dense (measured: L0 835 of 1024). The YAML says what was measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from runtime.config import integer, number
from train.recipe import init_tied_
from train.saes.base import (Codes, FromSAELens, Output, SAE, SAELensForm, input_shift, register, saelens_weights,
                             sq_error)
from train.saes.flops import Cost


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 where -1/2 < u < 1/2, else 0; same shape and dtype as u."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """f = JumpReLU_theta(pre) = pre * H(pre - theta), with the paper's STE for theta.

    Forward:  pre [B, M], theta [M] (> 0), eps (a positive scalar, float or 0-d tensor) -> f [B, M].
    Backward, from g = dLoss/df [B, M]:
        dLoss/dpre   = g * H(pre - theta)                                          [B, M]
        dLoss/dtheta = sum_b g_b * (-(theta / eps) * K((pre_b - theta) / eps))     [M]
    eps gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = g * (pre > theta).to(g.dtype)
        grad_theta = (g * (-(theta / eps)) * rectangle((pre - theta) / eps)).sum(0)
        return grad_pre, grad_theta, None


class Step(torch.autograd.Function):
    """H(pre - theta), the indicator that a latent fires, with the paper's STE for theta.

    Forward:  pre [B, M], theta [M] (> 0), eps (a positive scalar) -> {0, 1} [B, M] in theta's dtype
              (float32 under bfloat16 autocast, so that per-token counts stay exact).
    Backward, from g = dLoss/dH [B, M]:
        dLoss/dpre   = 0 (returned as None: the L0 term never trains the encoder)
        dLoss/dtheta = sum_b g_b * (-(1 / eps) * K((pre_b - theta) / eps))         [M]
    """

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(theta.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (g * (-1.0 / eps) * rectangle((pre - theta) / eps)).sum(0)
        return None, grad_theta, None


@register
class JumpReLUSAE(SAE):
    arch = "jumprelu"
    display_name = "JumpReLU"
    size_args = ("width",)
    model_rules = {"width": integer(1), "l0_coeff": number(0), "warmup_frac": number(0, 1),
                   "bandwidth": number(0, lo_open=True), "threshold_init": number(0, lo_open=True)}

    def __init__(self, d: int, width: int, l0_coeff: float | None = None, warmup_frac: float | None = None,
                 bandwidth: float | None = None, threshold_init: float | None = None):
        super().__init__(d)
        l0_coeff, warmup_frac, bandwidth, threshold_init = self.defaults(
            l0_coeff=l0_coeff, warmup_frac=warmup_frac, bandwidth=bandwidth, threshold_init=threshold_init)
        self.width, self.l0_coeff, self.warmup_frac = width, l0_coeff, warmup_frac
        self.bandwidth, self.threshold_init = bandwidth, threshold_init
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.log_theta = nn.Parameter(torch.full((width,), math.log(threshold_init)))
        self.W_dec = nn.Parameter(torch.empty(width, d))
        init_tied_(self.W_enc, self.W_dec)
        self.register_buffer("scale", torch.tensor(1.0))  # s = sqrt(E ||x||^2), set by init_from_batch
        self.register_buffer("l0_now", torch.tensor(l0_coeff))  # lambda_t, set by schedule

    @classmethod
    def cost_formula(cls, d: int, *, width: int, sparse_backward: bool = False, dense_decoder: bool = False) -> Cost:
        """M = width (dense codes: both flags are always False). Forward 4dM, train 10dM, as relu.

        Encoder x @ W_enc^T 2dM and decoder f @ W_dec 2dM, both dense. Backward: decoder grad W_dec
        2dM + grad f 2dM; encoder grad W_enc 2dM only: x has no trainable bias subtracted, so there
        is no input-gradient matmul. The thresholds, both step functions, their kernels and the L0
        are elementwise (not counted). Parameters 2Md + 2M + d."""
        m = width
        params = 2 * m * d + 2 * m + d  # W_enc, W_dec [M, d]; b_enc, log_theta [M]; b_pre [d]
        forward = 4 * d * m  # encoder + decoder, dense
        train = forward + 6 * d * m  # grad W_dec, grad f, grad W_enc (no input gradient)
        return Cost(params=params, forward=float(forward), train=float(train))

    @property
    def n_latents(self) -> int:
        return self.width

    saelens_architecture = "jumprelu"
    saelens_imports = ("jumprelu",)

    def to_saelens(self) -> SAELensForm:
        """SAELens jumprelu without apply_b_dec_to_input. SAELens's JumpReLU is ReLU(pre) 1[pre > threshold],
        ours for thresholds >= 0 (ours are exp(log_theta) > 0). The `scale` buffer sets only the units of
        the training hyper-parameters (the encoder does not rescale inputs): nothing of it is exported."""
        return SAELensForm("jumprelu", {"apply_b_dec_to_input": False},
                           {"W_enc": self.W_enc.T, "b_enc": self.b_enc, "threshold": self.theta,
                            "W_dec": self.W_dec, "b_dec": self.b_pre})

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens:
        """A SAELens threshold below 0 acts as 0 (the ReLU): clamped to 0 (log_theta = -inf, theta = 0 exactly)."""
        saelens_weights(cfg, tensors, {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"})
        t = tensors
        b_enc = t["b_enc"]
        if cfg["apply_b_dec_to_input"]:  # ours encodes x itself
            b_enc = b_enc - input_shift(t["W_enc"], t["b_dec"])
        return FromSAELens({"width": cfg["d_sae"]},
                           {"W_enc": t["W_enc"].T, "b_enc": b_enc, "log_theta": t["threshold"].clamp_min(0).log(),
                            "W_dec": t["W_dec"], "b_pre": t["b_dec"]})

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "width": self.width, "l0_coeff": self.l0_coeff, "warmup_frac": self.warmup_frac,
                "bandwidth": self.bandwidth, "threshold_init": self.threshold_init}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    def schedule(self, done: float, total: float) -> None:
        ramp = self.warmup_frac * total
        self.l0_now.fill_(self.l0_coeff * (min(1.0, done / ramp) if ramp > 0 else 1.0))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """b_pre at the geometric median of x [B, d]; the input scale s = sqrt(mean ||x||^2) of the
        batch; every threshold at threshold_init * s."""
        super().init_from_batch(x)
        self.scale.fill_(x.float().pow(2).sum(-1).mean().sqrt().clamp_min(1e-12))
        self.log_theta.fill_(math.log(self.threshold_init) + self.scale.log().item())

    @property
    def theta(self) -> torch.Tensor:
        """The thresholds [M], in the input's units."""
        return self.log_theta.exp()

    @property
    def eps(self) -> torch.Tensor:
        """The STE bandwidth in the input's units: bandwidth * s (a 0-d tensor)."""
        return self.bandwidth * self.scale

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d] -> pre = W_enc x + b_enc [B, M]."""
        return x @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> dense codes f [B, M]."""
        return Codes(dense=JumpReLU.apply(self.pre_activations(x), self.theta, self.eps))

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d]."""
        return codes.dense @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> Output:
        pre, theta, eps = self.pre_activations(x), self.theta, self.eps
        codes = Codes(dense=JumpReLU.apply(pre, theta, eps))
        recon = self.decode(codes)
        mse = sq_error(x, recon)
        sparsity = Step.apply(pre, theta, eps).sum(-1).mean()  # L0 per token, its gradient into theta only
        loss = mse + self.l0_now * self.scale.square() * sparsity
        return Output(recon=recon, codes=codes, losses={"loss": loss, "mse": mse, "sparsity": sparsity})
