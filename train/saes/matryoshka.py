"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders"): a BatchTopK SAE whose dictionary is trained so that
each of its nested prefixes is an SAE by itself.

    a, z   as BatchTopK (train/saes/batchtopk.py): z keeps the B*k largest ReLU pre-activations of the
           batch in training, those above theta at inference                            [B, M]
    prefix widths  m_1 < m_2 < ... < m_G = M, m_g = round(f_g M) for the fractions f_g in `prefixes`
    x_hat_g = sum_{i < m_g} z_i W_dec,i + b_pre          the reconstruction by the first m_g latents
    loss    = (1/G) sum_g ||x - x_hat_g||^2               (each summed over d, mean over tokens)

x_hat_G is the SAE's reconstruction (`recon`, "mse" in the losses); the same codes z serve every
prefix, so the early latents must reconstruct on their own and take the general features, the later
ones the refinements: the training rule that counters feature absorption and splitting. Only training
changes: encode, decode and the inference threshold are BatchTopK's, and so are the SAELens export
(a jumprelu) and the FLOP counts.

Written from our recollection of the paper and of its public implementations, not from the paper's
text (not readable on these machines): the uniform mean over the G prefix losses (a sum differs by
the factor G, which Adam mostly absorbs, but then AuxK's weight and the loss scale would differ from
BatchTopK's), fixed prefixes rather than sampled ones, and the default fractions 1/32, 3/32, 7/32,
15/32 (groups of 1/32, 1/16, 1/8, 1/4 and the rest) are the ones we remember; see
docs/architectures/matryoshka.md.

Fast path: the kept codes come ordered by token then latent, and each prefix group is a contiguous
range of latents, so bag b G + g (token b, group g) gathers token b's codes of group g in one
embedding bag over all B G bags: exactly the 2kd FLOPs per token of BatchTopK's decoder, [B, G, d]
group sums, and the prefix reconstructions are their running sum over g (elementwise, not counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from runtime.config import Rule, list_of, number
from train.saes.auxk import auxk_losses
from train.saes.base import Output, SAELensForm, register, sq_error
from train.saes.batchtopk import BatchTopKSAE
from train.saes.flops import Cost
from train.saes.kernels import row_offsets

FRACTION: Rule = number(0, 1, lo_open=True, hi_open=True)


def prefix_widths(prefixes: list[float] | tuple[float, ...], width: int, what: str = "the width") -> list[int]:
    """The fractions f_1 < ... < f_{G-1} in (0, 1) of `width` -> the prefix widths m_1 < ... < m_G = width,
    m_g = round(f_g width); ValueError (one line) when they are not increasing fractions or round to
    widths that are not strictly increasing and at least 1."""
    fractions = list(prefixes)
    for i, f in enumerate(fractions):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ValueError(f"model.prefixes[{i}]={f!r} is not a fraction of {what} in (0, 1) (the full width "
                             "is always the last prefix)")
    if any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
        raise ValueError(f"model.prefixes={fractions} must be strictly increasing")
    widths = [round(f * width) for f in fractions] + [width]
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"model.prefixes={fractions} of {what} {width} give prefix widths {widths}, which must be "
                         f"at least 1 and strictly increasing (fewer or further apart fractions, or a wider SAE)")
    return widths


def grouped_sums(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, groups: torch.Tensor, n_rows: int,
                 n_groups: int, w_dec: torch.Tensor) -> torch.Tensor:
    """Each token's codes summed by group: rows, cols, vals, groups [F] ordered by row and, within a row, by
    group -> [n_rows, n_groups, d], entry (b, g) = sum over token b's codes in group g of val * w_dec[col].
    One embedding bag (2d FLOPs per code)."""
    bags = rows * n_groups + groups  # non-decreasing
    summed = F.embedding_bag(cols, w_dec, row_offsets(bags, n_rows * n_groups)[1], mode="sum",
                             per_sample_weights=vals.to(w_dec.dtype))
    return summed.view(n_rows, n_groups, -1)


def prefix_losses(x: torch.Tensor, sums: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, d] (what is reconstructed), group sums [B, G, d], what every prefix adds them to, base ([d]
    b_pre, or [B, d] with a transcoder's skip connection) -> (the prefix reconstructions' squared errors [G],
    the full reconstruction [B, d]): x_hat_g = base + sum_{h <= g} sums[:, h]."""
    recons = sums.cumsum(1) + (base if base.dim() == 1 else base[:, None])
    errors = torch.stack([sq_error(x, recons[:, g]) for g in range(recons.shape[1])])
    return errors, recons[:, -1]


@register
class MatryoshkaSAE(BatchTopKSAE):
    arch = "matryoshka"
    display_name = "Matryoshka"
    model_rules = {**BatchTopKSAE.model_rules, "prefixes": list_of(FRACTION, "a non-empty list of fractions in (0, 1)")}

    def __init__(self, d: int, width: int, k: int, prefixes: list[float] | None = None,
                 theta_decay: float | None = None, aux_k: int | None = None, aux_coeff: float | None = None,
                 transcoder: bool = False, skip: bool | None = None):
        super().__init__(d, width, k, theta_decay=theta_decay, aux_k=aux_k, aux_coeff=aux_coeff, transcoder=transcoder,
                         skip=skip)
        prefixes, = self.defaults(prefixes=prefixes)
        self.prefixes = [float(f) for f in prefixes]
        self.widths = prefix_widths(self.prefixes, width)
        # latent -> its group g (latents m_{g-1} .. m_g - 1), for bucketize
        self.register_buffer("bounds", torch.tensor(self.widths[:-1]), persistent=False)

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        super().check_model(model)
        prefix_widths(model["prefixes"], model["width"], "model.width")

    @classmethod
    def cost_formula(cls, d: int, *, width: int, k: int, sparse_backward: bool = False,
                     dense_decoder: bool = False) -> Cost:
        """BatchTopK's (and so TopK's): forward 2dM + 2kd; train 6dM + 6kd (dense backward), 2dM + 10kd
        (sparse). The prefix reconstructions cost no matmul: one embedding bag of the B*k kept W_dec rows
        gives every (token, group) sum, 2kd per token as BatchTopK's decoder, and the prefixes are their
        running sums (elementwise). The G prefix errors are elementwise too. Parameters 2Md + M + d."""
        return super().cost_formula(d, width=width, k=k, sparse_backward=sparse_backward, dense_decoder=dense_decoder)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "prefixes": list(self.prefixes)}

    saelens_architecture = "jumprelu"  # at inference a BatchTopK: the same export and import
    saelens_imports = ("jumprelu",)

    def to_saelens(self) -> SAELensForm:
        """BatchTopK's: the prefixes shape training only, not the inference rule."""
        return super().to_saelens()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Output:
        """x [B, d] -> its reconstruction, or a transcoder's of `target` [B, d], with the losses."""
        rows, cols, vals = self._kept(x)
        if self.training and torch.is_grad_enabled():
            self._update_theta(vals.detach())
        groups = torch.bucketize(cols, self.bounds, right=True)
        sums = grouped_sums(rows, cols, vals, groups, len(x), len(self.widths), self.W_dec)
        errors, recon = prefix_losses(x if target is None else target, sums, self.skipped(x, self.b_pre))
        losses = auxk_losses(self, x, recon, errors.mean(), target)  # the objective: the mean over the prefixes
        losses.update(mse=errors[-1], prefix_mse=errors[:-1].mean())  # the full SAE's error; the smaller prefixes'
        return Output(recon=recon, codes=self._pad(rows, cols, vals, len(x)), losses=losses)
