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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from runtime.config import integer, number, one_of
from train.recipe import geometric_median, init_tied_
from train.saes.base import SAE, Codes, Output, register, sq_error
from train.saes.flops import Cost
from train.saes.kernels import decode_grouped, decode_rows, runs_sparse, topk_encode, topk_encode_reference

MATCHES = ("width", "flops")  # model.match: how the configured width sizes the experts


@register
class SwitchSAE(SAE):
    arch = "switch"
    display_name = "Switch"
    size_args = ("n_experts", "expert_width", "k")
    sparse_codes = True
    has_experts = True
    # Data parallel (train.dist): the loop sets this to a differentiable mean over ranks, so that f_i
    # and P_i are statistics of every rank's tokens and the aux loss is the one of the global batch.
    global_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, d: int, n_experts: int, expert_width: int, k: int, alpha: float):
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

    model_rules = {"n_experts": integer(1), "match": one_of(*MATCHES), "width": integer(1), "k": integer(1),
                   "alpha": number(0)}

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        super().check_model(model)
        n, width = model["n_experts"], model["width"]
        if model["match"] == "width" and width % n:
            raise ValueError(f"model.width={width} is not divisible by model.n_experts={n} (model.match=width "
                             "splits the width over the experts)")
        e = cls.expert_width(model)
        if model["k"] > e:
            split = f"model.width={width} / model.n_experts={n}" if model["match"] == "width" else "model.width"
            raise ValueError(f"model.k={model['k']} is larger than an expert's width {e} ({split})")

    @staticmethod
    def expert_width(model: Mapping[str, Any]) -> int:
        """e: the width split over the experts (match=width), or the width itself (match=flops)."""
        return model["width"] // model["n_experts"] if model["match"] == "width" else model["width"]

    @classmethod
    def constructor_kwargs(cls, model: Mapping[str, Any], d: int) -> dict[str, Any]:
        """width, n_experts (N), match, k, alpha -> d, n_experts, expert_width (e), k, alpha.
        match=width: the width is split over the experts, e = width / N (M = width, the parameters
        of a TopK SAE of that width); match=flops: every expert is `width` wide, e = width
        (M = N width, the FLOPs of that TopK SAE plus the router)."""
        cls.check_model(model)
        m = {key: value for key, value in model.items() if key not in ("width", "match")}
        return {"d": d, "expert_width": cls.expert_width(model), **m}

    @classmethod
    def cost_formula(cls, d: int, *, n_experts: int, expert_width: int, k: int, sparse_backward: bool = False,
                     dense_decoder: bool = False) -> Cost:
        """N = n_experts, e = expert_width. Forward 2dN + 2de + 2kd; train 6dN + 6de + 6kd (dense
        backward), 6dN + 2de + 10kd (sparse); with dense_decoder (and the dense backward) forward
        2dN + 4de, train 6dN + 12de.

        Router (x - b_router) @ W_router^T: 2dN forward, 4dN backward (grad W_router, and grad of
        x - b_router since b_router is trained). Each token goes through its own expert's encoder
        only: 2de forward, 4de backward (grad W_enc[i], grad of x - b_pre), or 4kd with the sparse
        backward. Decoder as topk's (embedding bag, 2kd forward, 4kd backward), or with
        dense_decoder as narrow experts run it by default (`decode_grouped`): the token's dense codes
        over its expert's e latents times that expert's decoder, 2de forward, 4de backward.
        Parameters 2Md + Nd + 2d with M = N e."""
        n, e = n_experts, expert_width
        if k > e:
            raise ValueError(f"k={k} must be at most the expert width {e}")
        params = 2 * n * e * d + n * d + 2 * d  # W_enc, W_dec [N, e, d]; W_router [N, d]; b_router, b_pre [d]
        router = 2 * d * n
        encoder = 2 * d * e  # the token's own expert only
        decoder = 2 * e * d if dense_decoder else 2 * k * d
        forward = router + encoder + decoder
        # backward: router grad W_router + grad of x - b_router; decoder grad of vals + grad of its
        # rows; encoder grad W_enc[i] + grad of x - b_pre, dense over e latents or only the k active
        train = forward + 2 * router + 2 * decoder + 2 * (2 * k * d if sparse_backward else encoder)
        return Cost(params=params, forward=float(forward), train=float(train))

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
        return runs_sparse(self.kernels, self.expert_width, self.k)

    @property
    def dense_decoder(self) -> bool:
        """Narrow experts decode with grouped matmuls (kernels="dense", or "auto" for them),
        otherwise an embedding bag (train/saes/kernels.py)."""
        return self.kernels != "reference" and not self.sparse_backward

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
        if self.kernels == "reference":
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
