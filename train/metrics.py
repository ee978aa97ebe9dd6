"""Reconstruction metrics of an SAE over a stream of activation rows, accumulated in float64.

For rows x [n, d] and reconstructions x_hat [n, d], pooled over every evaluated token t:

    mse       = mean_t sum_j (x_tj - x_hat_tj)^2               (summed over d: the paper's tables)
    nmse      = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2
    fve       = 1 - sum_j Var_t(x_j - x_hat_j) / sum_j Var_t(x_j)
                (variances over tokens, per dimension, then summed over dimensions: one pooled ratio,
                not a mean of per-token ratios; the error is centred too, so a constant bias is forgiven)
    l0        = mean_t number of non-zero codes (after the TopK or the gate; Switch: in the chosen expert)
    dead_frac = fraction of latents that never fire in the first `dead_window` evaluated tokens
    expert_load     (Switch) fraction of tokens routed to each expert
    expert_entropy  (Switch) entropy of expert_load in nats; log N is uniform routing
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from runtime.device import autocast
from train.saes import SAE, Codes


class ReconMetrics:
    """Running sums for the metrics above; `update` per batch, `result` at the end."""

    def __init__(self, d: int, n_latents: int, n_experts: int | None, dead_window: int | None):
        f64 = torch.float64
        self.n = 0
        self.sq_err = 0.0
        self.sum_x, self.sum_x2 = torch.zeros(d, dtype=f64), torch.zeros(d, dtype=f64)
        self.sum_e, self.sum_e2 = torch.zeros(d, dtype=f64), torch.zeros(d, dtype=f64)
        self.active = 0
        self.dead_window = dead_window
        self.fired = torch.zeros(n_latents, dtype=torch.bool)
        self.window_seen = 0
        self.load = torch.zeros(n_experts, dtype=f64) if n_experts else None

    def update(self, x: torch.Tensor, recon: torch.Tensor, codes: Codes) -> None:
        """x, recon [n, d]; codes of the same n tokens."""
        x, err = x.double().cpu(), (x - recon).double().cpu()
        err2 = err * err
        self.n += len(x)
        self.sq_err += err2.sum().item()
        self.sum_x += x.sum(0)
        self.sum_x2 += (x * x).sum(0)
        self.sum_e += err.sum(0)
        self.sum_e2 += err2.sum(0)
        active = codes.active().cpu()
        self.active += int(active.sum())
        take = len(x) if self.dead_window is None else max(0, min(len(x), self.dead_window - self.window_seen))
        if take:
            self.fired |= codes.fired(len(self.fired), take).cpu()
            self.window_seen += take
        if self.load is not None:
            self.load += torch.bincount(codes.expert.cpu(), minlength=len(self.load)).double()

    def result(self) -> dict[str, Any]:
        n = self.n
        if n == 0:
            raise ValueError("no tokens were evaluated")
        var_x = (self.sum_x2 - self.sum_x.pow(2) / n).sum().item()  # sum_j of n * Var_t(x_j)
        var_e = (self.sum_e2 - self.sum_e.pow(2) / n).sum().item()
        out: dict[str, Any] = {
            "mse": self.sq_err / n,
            "nmse": self.sq_err / var_x if var_x > 0 else None,  # undefined for constant inputs
            "fve": 1.0 - var_e / var_x if var_x > 0 else None,
            "l0": self.active / n,
            "dead_frac": 1.0 - self.fired.double().mean().item(),
            "dead_window_tokens": self.window_seen,
            "eval_tokens": n,
            "expert_load": None,
            "expert_entropy": None,
        }
        if self.load is not None:
            load = self.load / self.load.sum()
            out["expert_load"] = load.tolist()
            out["expert_entropy"] = -sum(p * math.log(p) for p in load.tolist() if p > 0)
        return out


@torch.inference_mode()
def reconstruction_metrics(sae: SAE, rows: Iterable[torch.Tensor], *, batch_size: int, dead_window: int | None,
                           dtype: torch.dtype) -> dict[str, Any]:
    """Run the SAE over `rows` (tensors [n, d], any n; a transcoder's [n, 2 d], its input and target side by
    side) and return the metrics of the module docstring (of the reconstruction against the target)."""
    device = next(sae.parameters()).device
    layout = sae.layout()
    acc = ReconMetrics(layout.d, layout.n_latents, layout.n_experts or None, dead_window)
    for chunk in rows:
        for batch in chunk.split(batch_size):
            x, target = sae.split(batch.to(device))  # a transcoder's rows: [x | its target]
            with autocast(device, dtype):
                out = sae(x) if target is x else sae(x, target)
            acc.update(target.float(), out.recon.float(), out.codes)
    return acc.result()
