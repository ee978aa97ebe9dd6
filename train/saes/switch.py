"""Switch SAE (Mudide et al. 2025, eq. 3-4): a router picks one of N TopK experts per token.

    p      = softmax(W_router (x - b_router))                  [B, N]
    i*     = argmax_i p_i                                      [B]
    x_hat  = p_i* * W_dec,i*^T TopK(W_enc,i* (x - b_pre)) + b_pre   (experts have no encoder bias)
    loss   = ||x - x_hat||^2 + alpha * d * N * sum_i f_i P_i
             f_i = fraction of tokens routed to i, P_i = mean router probability of i

Each expert's encoder runs only on the tokens routed to it (train/saes/kernels.py: one sort, one
grouped matmul, a sparse or grouped backward): compute and pre-activation memory scale with B x M/N, not B x M.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from train.saes.base import SAE, Codes, Output, register, sq_error
from train.saes.kernels import decode_grouped, runs_sparse, topk_encode, topk_encode_reference
from train.saes.topk import decode_rows, init_tied_
from train.recipe import geometric_median


@register
class SwitchSAE(SAE):
    arch = "switch"
    # Data parallel (train.dist): the loop sets this to a differentiable mean over ranks, so that f_i
    # and P_i are statistics of every rank's tokens and the aux loss is the one of the global batch.
    global_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, d: int, n_experts: int, expert_width: int, k: int, alpha: float = 3.0):
        super().__init__(d)
        if not 0 < k <= expert_width:
            raise ValueError(f"k={k} must be between 1 and an expert's width {expert_width}")
        self.n_experts, self.expert_width, self.k, self.alpha = n_experts, expert_width, k, alpha
        self.W_router = nn.Parameter(torch.zeros(n_experts, d))
        self.b_router = nn.Parameter(torch.zeros(d))
        self.W_enc = nn.Parameter(torch.empty(n_experts, expert_width, d))
        self.W_dec = nn.Parameter(torch.empty(n_experts, expert_width, d))
        init_tied_(self.W_enc, self.W_dec)
        with torch.no_grad():
            nn.init.normal_(self.W_router, std=d**-0.5)

    @property
    def n_latents(self) -> int:
        return self.n_experts * self.expert_width

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "n_experts": self.n_experts, "expert_width": self.expert_width,
                "k": self.k, "alpha": self.alpha}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    @property
    def sparse_backward(self) -> bool:
        return runs_sparse(self.backward, self.expert_width, self.k)

    @property
    def dense_decoder(self) -> bool:
        """Narrow experts decode with grouped matmuls (backward="dense", or "auto" for them),
        otherwise an embedding bag (train/saes/kernels.py)."""
        return self.backward != "reference" and not self.sparse_backward

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """b_pre and b_router both start at the batch's geometric median (not tied afterwards)."""
        median = geometric_median(x)
        self.b_pre.copy_(median)
        self.b_router.copy_(median)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] -> (router probabilities p [B, N], chosen expert [B])."""
        p = torch.softmax((x - self.b_router) @ self.W_router.T, dim=-1)
        return p, p.argmax(dim=-1)

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> expert [B], probs [B, N], global latent idx [B, k] in 0..M-1 and vals [B, k]
        already multiplied by the gate p_i* (so decoding is linear and the router gets gradient)."""
        probs, expert = self.route(x)
        vals, idx = self.encode_experts(x - self.b_pre, expert)
        gate = probs.gather(1, expert[:, None])  # [B, 1]: p_i*
        return Codes(idx=idx, vals=gate * vals, expert=expert, probs=probs)

    def encode_experts(self, xc: torch.Tensor, expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts this module holds (all N, or a shard of them), each on its own tokens:
        xc [B, d] (x - b_pre), expert [B] in 0..held-1 -> vals [B, k] >= 0 (no gate), idx [B, k] in
        0..held * e - 1."""
        args = (xc, self.W_enc, None, expert, self.k)
        if self.backward == "reference":
            return topk_encode_reference(*args)
        return topk_encode(*args, self.sparse_backward)

    def decode_experts(self, idx: torch.Tensor, vals: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """sum_j vals[:, j] W_dec[idx[:, j]] over the held experts: idx, vals [B, k], expert [B] -> [B, d]."""
        if self.dense_decoder:
            return decode_grouped(idx, vals, self.W_dec, expert)
        return decode_rows(idx, vals, self.W_dec.view(-1, self.d))

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d] = p_i* E_i*(x - b_pre) + b_pre (the gate is in the values)."""
        return self.decode_experts(codes.idx, codes.vals, codes.expert) + self.b_pre

    def balance(self, expert: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The load-balancing loss L_aux = N sum_i f_i P_i and the expert load f_i [N], from the chosen
        expert [B] and router probabilities [B, N] (of every rank's tokens when `global_mean` is set)."""
        load = torch.bincount(expert, minlength=self.n_experts).to(probs.dtype) / len(expert)  # f_i
        mean_probs = probs.mean(dim=0)  # P_i
        if self.global_mean is not None:  # one collective for both; f_i carries no gradient
            load, mean_probs = self.global_mean(torch.cat([load, mean_probs])).split(self.n_experts)
            load = load.detach()
        return self.n_experts * (load * mean_probs).sum(), load

    def forward(self, x: torch.Tensor) -> Output:
        codes = self.encode(x)
        recon = self.decode(codes)
        return self.output(x, recon, codes, codes.expert, codes.probs)

    def output(self, x: torch.Tensor, recon: torch.Tensor, codes: Codes, expert: torch.Tensor, probs: torch.Tensor
               ) -> Output:
        """The Output of a forward pass: x, recon [B, d], the routing of x (expert [B], probs [B, N])."""
        mse = sq_error(x, recon)
        aux, load = self.balance(expert, probs)
        loss = mse + self.alpha * self.d * aux
        return Output(recon=recon, codes=codes, losses={"loss": loss, "mse": mse, "aux": aux},
                      stats={"expert_load": load})
