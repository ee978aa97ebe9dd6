"""AuxK (Gao et al. 2024, appendix A.2): the dead latents learn to reconstruct what the live ones miss.

    e      = x - x_hat                                  [B, d]  the residual, a fixed target (no gradient)
    z_aux  = ReLU(TopK_{k_aux}(pre-activations of the dead latents only))
    e_hat  = W_dec[dead]^T z_aux                        (no bias)
    L_auxk = sum ||e - e_hat||^2 / sum ||e||^2 (over the batch's tokens);  loss = MSE + aux_coeff * L_auxk

normalised by the residual's own size, so that aux_coeff means the same at any activation scale
(1 = the dead latents explain none of the residual, 0 = all of it).

A latent is dead when it has not fired for the run's `dead_window` tokens (train/loop.py
`DeadLatents`); the loop hands the SAE its mask before every training step (`SAE.dead`). With no dead
latent (or outside training) the term is 0. Only the dead latents' encoder and decoder rows get its
gradient: the live ones are not in e_hat, and e carries none. Gao et al. use k_aux = 512 and
aux_coeff = 1/32 (conf/train/model/topk.yaml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.saes.base import SAE


def auxk_loss(xc: torch.Tensor, resid: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor | None,
              w_dec: torch.Tensor, k_aux: int) -> torch.Tensor:
    """The squared error of B tokens' residuals reconstructed from D dead latents: xc [B, d] the encoder
    input, resid [B, d] the residual x - x_hat, w_enc, w_dec [D, d] and b_enc [D] (or None) the dead
    latents' rows -> sum ||e - e_hat||^2 [] (summed over the tokens: callers add the parts of several
    experts, then divide by `residual_norm`)."""
    if len(w_enc) == 0 or len(xc) == 0:
        return xc.new_zeros(())
    pre = xc @ w_enc.T  # [B, D]
    if b_enc is not None:
        pre = pre + b_enc
    vals, idx = pre.topk(min(k_aux, len(w_enc)), dim=-1)  # [B, k_aux]
    e_hat = torch.nn.functional.embedding_bag(idx, w_dec, per_sample_weights=vals.relu(), mode="sum")
    return torch.nn.functional.mse_loss(e_hat, resid.detach(), reduction="sum")


def residual_norm(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """sum ||x - x_hat||^2 over the batch, no gradient: the normaliser of L_auxk (at least a tiny epsilon)."""
    return (x - recon).detach().pow(2).sum().clamp_min(1e-12)


def auxk_losses(sae: SAE, x: torch.Tensor, recon: torch.Tensor, mse: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss terms of a single-dictionary SAE (W_enc, b_enc, W_dec [M, d], b_pre): {loss, mse}, and
    with AuxK on (`sae.aux_k` > 0) also auxk, added to loss with weight `sae.aux_coeff`."""
    if not sae.aux_k:
        return {"loss": mse, "mse": mse}
    dead = sae.dead_rows()
    auxk = x.new_zeros(()) if dead is None else auxk_loss(
        x - sae.b_pre, x - recon, sae.W_enc[dead], sae.b_enc[dead], sae.W_dec[dead], sae.aux_k) / residual_norm(x, recon)
    return {"loss": mse + sae.aux_coeff * auxk, "mse": mse, "auxk": auxk}
