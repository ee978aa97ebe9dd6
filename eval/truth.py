"""How well learned feature directions match a synthetic store's true ones (harvest/synth.py).

    recovery(learned [M, d], true [F, d], threshold=0.9) -> {recovered, best_cos quantiles, duplicates, ...}
    absorption(fires [n] per parent, parent_on, child_on) -> {absorption, parent_recall, parents}

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


def best_match(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """learned [M, d], true [F, d] -> [F]: each true feature's best-matching latent (largest cosine)."""
    return (_unit(learned.float()) @ _unit(true.float()).T).argmax(dim=0)


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


MIN_ROWS = 20  # a parent is scored on rows where it fires with and without a child only with this many of each


def absorption(latent_fires: torch.Tensor, parent_on: torch.Tensor, child_on: torch.Tensor) -> dict[str, Any]:
    """Feature absorption on the synthetic hierarchies (harvest/synth.py: a child fires only with its parent).

    For each parent p (columns, P of them) with its best-matching latent L_p: on n held-out rows,
    latent_fires [n, P] whether L_p fired, parent_on [n, P] whether p fired, child_on [n, P] whether one
    of p's children fired. The latent's recall where the parent fires alone, r_alone, and where a child
    fires with it, r_child; absorption_p = clip(1 - r_child / r_alone, 0, 1): 0 when the parent's latent
    fires as often with a child as without, 1 when a child's presence silences it (the child's latent
    absorbed the parent's direction). Parents with fewer than MIN_ROWS rows of either kind, or r_alone = 0,
    are not scored. Returns the mean absorption and r_alone over the scored parents, and their count."""
    alone, with_child = parent_on & ~child_on, parent_on & child_on
    n_alone, n_child = alone.sum(0), with_child.sum(0)
    r_alone = (latent_fires & alone).sum(0) / n_alone.clamp(min=1)
    r_child = (latent_fires & with_child).sum(0) / n_child.clamp(min=1)
    scored = (n_alone >= MIN_ROWS) & (n_child >= MIN_ROWS) & (r_alone > 0)
    per_parent = (1 - r_child[scored] / r_alone[scored]).clamp(0, 1)
    return {"absorption": float(per_parent.mean()) if len(per_parent) else None,
            "parent_recall": float(r_alone[scored].mean()) if len(per_parent) else None,
            "parents": int(scored.sum())}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
