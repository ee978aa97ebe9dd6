"""AuxK (Gao et al. 2024, appendix A.2): the dead latents learn to reconstruct what the live ones miss.

    e      = x - x_hat                                  [B, d]  the residual, a fixed target (no gradient)
    z_aux  = ReLU(TopK_{k_aux}(pre-activations of the dead latents only))
    e_hat  = W_dec[dead]^T z_aux                        (no bias)
    L_auxk = mean over tokens of ||e - e_hat||^2;         loss = MSE + aux_coeff * L_auxk

in the units of the paper's MSE (squared error summed over d, mean over tokens), as Gao et al. write
it: L_auxk starts at the MSE itself (no dead latent explains anything yet) and aux_coeff weighs the two
errors directly (dividing L_auxk by ||e||^2 instead would shrink its gradient by the size of the MSE,
thousands on LM activations, and with it aux_coeff's meaning).

A latent is dead when it has not fired for the run's `dead_window` tokens (train/loop.py
`DeadLatents`); the loop hands the SAE its mask before every training step (`SAE.dead`). With no dead
latent (or outside training) the term is 0. Only the dead latents' encoder and decoder rows get its
gradient: the live ones are not in e_hat, and e carries none. Gao et al. use k_aux = 512 and
aux_coeff = 1/32 (conf/train/model/topk.yaml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from train.saes.kernels import decode_grouped, decode_rows, runs_sparse, topk_encode, topk_encode_reference

if TYPE_CHECKING:
    from train.saes.base import SAE


def dead_dictionary(dead: torch.Tensor, n_experts: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's dead latents side by side, padded to one count: dead [D] sorted latent ids in
    0..N*e-1 (N = n_experts experts of `width` = e latents; N = 1 for a single dictionary) ->
    (rows [N, Dmax] latent ids, valid [N, Dmax] bool, False on the padding)."""
    expert = dead.div(width, rounding_mode="floor")  # [D]
    count = torch.bincount(expert, minlength=n_experts)  # [N]
    slot = torch.arange(len(dead), device=dead.device) - (count.cumsum(0) - count)[expert]  # place within its expert
    rows = dead.new_zeros(n_experts, int(count.max()))
    valid = torch.zeros(rows.shape, dtype=torch.bool, device=dead.device)
    rows[expert, slot] = dead
    valid[expert, slot] = True
    return rows, valid


def auxk_error(xc: torch.Tensor, resid: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor | None,
               w_dec: torch.Tensor, dead: torch.Tensor, expert: torch.Tensor | None, k_aux: int,
               kernels: str) -> torch.Tensor:
    """sum over the B tokens of ||e - e_hat||^2, each token's residual e rebuilt from the dead latents of
    its own expert (tokens of an expert without dead latents left out): xc [B, d] the encoder input x - b_pre, resid [B, d] the residual x - x_hat, w_enc,
    w_dec [N, e, d] and b_enc [N, e] (or None) the whole dictionary, dead [D] sorted latent ids in
    0..N*e-1, expert [B] each token's expert (None when N = 1).

    The dead rows are gathered into a dictionary of N experts of Dmax latents (`dead_dictionary`;
    padding rows are zero, so their pre-activation is 0 and their code ReLU(0) = 0) and run through the
    TopK encoder kernel of train/saes/kernels.py: one (grouped) matmul of 2 d Dmax FLOPs per token,
    no [B, M] tensor and no loop over experts. Where the kernels' rule (`runs_sparse`, Dmax against
    k_aux) picks the sparse backward, the k_aux chosen rows decode as an embedding bag; otherwise both
    run dense, the decoder as a grouped matmul of the codes [B, Dmax] (k_aux = 512 rows gathered per
    token read more memory than that matmul moves). Gradient reaches the dead latents' rows only (and
    b_pre through xc)."""
    n, e, d = w_enc.shape
    rows, valid = dead_dictionary(dead, n, e)
    w = w_enc.reshape(n * e, d)[rows] * valid[..., None]  # [N, Dmax, d]
    b = None if b_enc is None else b_enc.reshape(n * e)[rows] * valid  # [N, Dmax]
    k = min(k_aux, rows.shape[1])
    sparse = runs_sparse(kernels, rows.shape[1], k) if kernels != "reference" else True
    if kernels == "reference":
        vals, slot = topk_encode_reference(xc, w, b, expert, k)
    else:
        vals, slot = topk_encode(xc, w, b, expert, k, sparse)
    if sparse:  # k_aux of many dead rows: an embedding bag of the chosen rows
        e_hat = decode_rows(rows.reshape(-1)[slot], vals, w_dec.reshape(n * e, d))  # [B, d]
    else:  # k_aux close to the dead count: their dense codes times their rows, at matmul speed
        dead_dec = w_dec.reshape(n * e, d)[rows] * valid[..., None]  # [N, Dmax, d]
        own = expert if expert is not None else slot.new_zeros(len(slot))
        e_hat = decode_grouped(slot, vals, dead_dec, own)
    if expert is None:
        return F.mse_loss(e_hat, resid.detach(), reduction="sum")
    has_dead = valid.any(dim=1)[expert]  # [B]: tokens of an expert with no dead latent add nothing
    return (e_hat - resid.detach()).pow(2).sum(dim=1).mul(has_dead).sum()


def auxk_losses(sae: SAE, x: torch.Tensor, recon: torch.Tensor, mse: torch.Tensor,
                target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms of a single-dictionary SAE (W_enc, b_enc, W_dec [M, d], b_pre) that read x and
    reconstructed `target` (None: x) as recon: {loss, mse}, and with AuxK on (`sae.aux_k` > 0) also auxk,
    added to loss with weight `sae.aux_coeff`."""
    if not sae.aux_k:
        return {"loss": mse, "mse": mse}
    dead = sae.dead_rows()
    residual = (x if target is None else target) - recon
    auxk = x.new_zeros(()) if dead is None else auxk_error(
        sae.centred(x), residual, sae.W_enc[None], sae.b_enc[None], sae.W_dec[None], dead, None, sae.aux_k,
        sae.kernels) / len(x)
    return {"loss": mse + sae.aux_coeff * auxk, "mse": mse, "auxk": auxk}
