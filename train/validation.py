"""Validation during training: the SAE's reconstruction of a fixed held-out sample, every
`eval_every` steps, logged to the run's validation.jsonl (`RunDir.VALIDATION`).

The sample is `eval_tokens` rows spread over the store's held-out chunks (never trained on), outlier
rows left out as in eval: `harvest.held_out.HeldOut.sample`. Runs on one store with the same
`data.eval_frac`, `data.outlier_factor` and `eval_tokens` see the same rows. A line holds the step,
the tokens and training FLOPs spent so far (FLOPs as eval counts them:
`train.saes.flops.algorithmic_cost`), the seconds of training so far (validation passes not
counted), and the metrics of `train.metrics` over the sample: mse, nmse, fve, l0, dead_frac
(latents that fire on none of the sample's tokens), expert_load and expert_entropy (Switch).

Cost: one encode + decode of the sample, about eval_tokens / (3 x batch_size) of a training step
(a forward pass is about a third of forward + backward), every eval_every steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from runtime.device import autocast
from train.metrics import ReconMetrics
from train.saes import SAE

class Validator:
    """Metrics of an SAE on the validation sample (kept on the training device)."""

    def __init__(self, rows: np.ndarray, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.x = torch.from_numpy(rows).to(device)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype

    @torch.inference_mode()
    def __call__(self, sae: SAE) -> dict[str, Any]:
        """encode + decode of every sample row (no losses, so no collective even in a data-parallel
        Switch; a transcoder's reconstruction against its target) -> the metrics of
        `train.metrics.ReconMetrics` with `eval_tokens` the rows used."""
        layout = sae.layout()
        acc = ReconMetrics(layout.d, layout.n_latents, layout.n_experts or None, dead_window=None)
        training = sae.training
        sae.eval()  # the inference rule, as eval will measure it (BatchTopK's threshold)
        try:
            for rows in self.x.split(self.batch_size):
                x, target = sae.split(rows)  # a transcoder's rows hold its target beside its input
                with autocast(self.device, self.dtype):
                    codes, recon = sae.reconstruct(x)
                acc.update(target, recon.float(), codes)
        finally:
            sae.train(training)
        out = acc.result()
        out.pop("dead_window_tokens")
        return out
