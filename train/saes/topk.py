"""TopK SAE (Gao et al. 2024): z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from runtime.config import FLAG, integer, number
from train.recipe import init_tied_
from train.saes.auxk import auxk_losses
from train.saes.base import (Codes, FromSAELens, Layout, Output, SAE, SAELensForm, input_shift, register, saelens_ints,
                             saelens_weights, sq_error)
from train.saes.flops import Cost
from train.saes.kernels import decode_rows, runs_sparse, topk_encode, topk_encode_reference


@register
class TopKSAE(SAE):
    arch = "topk"
    display_name = "TopK"
    size_args = ("width", "k")
    sparse_codes = True

    transcodes = True

    def __init__(self, d: int, width: int, k: int, aux_k: int | None = None, aux_coeff: float | None = None,
                 transcoder: bool = False, skip: bool | None = None):
        skip, = self.defaults(skip=skip)
        super().__init__(d, transcoder, skip)
        aux_k, aux_coeff = self.defaults(aux_k=aux_k, aux_coeff=aux_coeff)
        if not 0 < k <= width:
            raise ValueError(f"k={k} must be between 1 and the width {width}")
        self.width, self.k, self.aux_k, self.aux_coeff = width, k, aux_k, aux_coeff
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d))
        init_tied_(self.W_enc, self.W_dec)

    model_rules = {"width": integer(1), "k": integer(1), "aux_k": integer(0), "aux_coeff": number(0), "skip": FLAG}

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        super().check_model(model)
        if model["k"] > model["width"]:
            raise ValueError(f"model.k={model['k']} is larger than model.width={model['width']}")

    @classmethod
    def constructor_kwargs(cls, model: Mapping[str, Any], d: int) -> dict[str, Any]:
        """width (M), k -> d, width, k."""
        cls.check_model(model)
        return {"d": d, **model}

    @classmethod
    def cost_formula(cls, d: int, *, width: int, k: int, sparse_backward: bool = False,
                     dense_decoder: bool = False) -> Cost:
        """M = width. Forward 2dM + 2kd; train 6dM + 6kd (dense backward), 2dM + 10kd (sparse).

        Forward: encoder (x - b_pre) @ W_enc^T, 2dM; decoder embedding bag of the k chosen W_dec
        rows, 2kd. Backward: decoder, grad of vals 2kd + grad of the k chosen W_dec rows 2kd;
        encoder, grad W_enc 2dM + grad of (x - b_pre) 2dM, or with the sparse backward only the k
        active rows of each, 2kd + 2kd. The input gradient is computed because b_pre is trained
        (x itself needs none). Parameters 2Md + M + d."""
        if k > width:
            raise ValueError(f"k={k} must be at most the width {width}")
        m = width
        params = 2 * m * d + m + d  # W_enc, W_dec [M, d]; b_enc [M]; b_pre [d]
        encoder, decoder = 2 * d * m, 2 * k * d
        forward = encoder + decoder
        # decoder backward: grad of vals + grad of the k chosen W_dec rows
        # encoder backward: grad W_enc + grad of x - b_pre, dense over M latents or only the k active
        train = forward + 2 * decoder + 2 * (2 * k * d if sparse_backward else encoder)
        return Cost(params=params, forward=float(forward), train=float(train))

    @property
    def n_latents(self) -> int:
        return self.width

    def layout(self) -> Layout:
        return Layout(self.d, self.width, self.k)

    saelens_architecture = "topk"
    saelens_imports = ("topk",)

    def to_saelens(self) -> SAELensForm:
        """SAELens topk with apply_b_dec_to_input: the same encoder, W_enc transposed, b_pre as b_dec."""
        return SAELensForm("topk", {"apply_b_dec_to_input": True, "k": self.k, "rescale_acts_by_decoder_norm": False},
                           {"W_enc": self.W_enc.T, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_pre})

    @classmethod
    def check_saelens_config(cls, cfg: Mapping[str, Any]) -> None:
        saelens_ints(cfg, "k")

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens:
        """rescale_acts_by_decoder_norm (rank and code by pre ||W_dec,i||, decode by code / ||W_dec,i||) is
        folded in: W_enc,i and b_enc,i times ||W_dec,i||, W_dec,i over it; without apply_b_dec_to_input
        the b_dec ours subtracts is added back to b_enc."""
        saelens_weights(cfg, tensors, {"W_enc", "b_enc", "W_dec", "b_dec"})
        w_enc, b_enc, w_dec = tensors["W_enc"], tensors["b_enc"], tensors["W_dec"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            norm = w_dec.norm(dim=-1)  # [M]
            w_enc, b_enc, w_dec = w_enc * norm, b_enc * norm, w_dec / norm[:, None]
        if not cfg["apply_b_dec_to_input"]:
            b_enc = b_enc + input_shift(w_enc, tensors["b_dec"])
        return FromSAELens({"width": cfg["d_sae"], "k": cfg["k"]},
                           {"W_enc": w_enc.T, "b_enc": b_enc, "W_dec": w_dec, "b_pre": tensors["b_dec"]})

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "width": self.width, "k": self.k, "aux_k": self.aux_k, "aux_coeff": self.aux_coeff,
                **self.transcoder_config()}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    @property
    def sparse_backward(self) -> bool:
        return runs_sparse(self.kernels, self.width, self.k)

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> idx, vals [B, k] (the encoder's backward set by `self.kernels`)."""
        args = (self.centred(x), self.W_enc[None], self.b_enc[None], None, self.k)
        sparse = self.sparse_backward
        vals, idx = topk_encode_reference(*args) if self.kernels == "reference" else topk_encode(*args, sparse)
        return Codes(idx=idx, vals=vals)

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d]."""
        return decode_rows(codes.idx, codes.vals, self.W_dec) + self.b_pre

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Output:
        """x [B, d] -> its reconstruction, or a transcoder's of `target` [B, d], with the losses."""
        codes, recon = self.reconstruct(x)
        mse = sq_error(x if target is None else target, recon)
        return Output(recon=recon, codes=codes, losses=auxk_losses(self, x, recon, mse, target))
