"""How well learned feature directions match a synthetic store's true ones (harvest/synth.py).

    recovery(learned [M, d], true [F, d], threshold=0.9) -> {recovered, best_cos quantiles, duplicates, ...}

For each true feature f, best_cos_f = max_m cos(learned_m, true_f): the true feature is recovered if
best_cos_f > threshold (0.9: the convention of the synthetic-data SAE literature). A learned latent
is a duplicate when it matches (cos > threshold) a true feature that another latent matches better:
the measure of a dictionary spending several latents on one feature. The true dictionary scores
recovered = 1 with no duplicates; a random one in d dimensions scores near 0 (tested).
"""

from __future__ import annotations

from typing import Any

import torch

THRESHOLD = 0.9


def recovery(learned: torch.Tensor, true: torch.Tensor, threshold: float = THRESHOLD) -> dict[str, Any]:
    """Recovery and duplication of the true directions `true` [F, d] by `learned` [M, d] (module docstring)."""
    cos = _unit(learned.float()) @ _unit(true.float()).T  # [M, F]
    best_cos, _ = cos.max(dim=0)  # [F]
    match_cos, match = cos.max(dim=1)  # [M]: each latent's best true feature
    matched = match_cos > threshold
    # per true feature, the latents matching it beyond the threshold; all but the best are duplicates
    per_feature = torch.bincount(match[matched], minlength=true.shape[0])
    duplicates = int((per_feature - 1).clamp(min=0).sum())
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "features": int(true.shape[0]), "latents": int(learned.shape[0]), "threshold": threshold,
        "recovered": float((best_cos > threshold).float().mean()),
        "best_cos_mean": float(best_cos.mean()),
        "best_cos_quantiles": dict(zip(["q10", "q25", "q50", "q75", "q90"], torch.quantile(best_cos, q).tolist())),
        "matched_latents": int(matched.sum()),
        "duplicates": duplicates,
        "duplicate_frac": duplicates / max(int(learned.shape[0]), 1),
    }


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
