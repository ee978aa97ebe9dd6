"""Runs compared at equal training compute, from their validation curves.

A run's curve is its validation.jsonl (train/validation.py): held-out MSE after 0, e, 2e, ... steps,
with the cumulative training FLOPs (as eval counts them) and training seconds at each. Reading a
curve at a FLOP budget interpolates the MSE linearly in FLOPs between the two validations around
it; a run whose last validation is below the budget did not reach it (None, never extrapolated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eval.report import EvaluatedRun

Curve = Sequence[dict[str, Any]]  # validation records, ascending steps


def mse_at(curve: Curve, flops: float) -> float | None:
    """Held-out MSE after `flops` training FLOPs, interpolated; None if the run did not reach them."""
    points = [(v["train_flops"], v["mse"]) for v in curve if v.get("mse") is not None]
    if not points or flops > points[-1][0] or flops < points[0][0]:
        return None
    for (f0, m0), (f1, m1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            return m0 if f1 == f0 else m0 + (m1 - m0) * (flops - f0) / (f1 - f0)
    return points[-1][1]  # a curve of one point, read at exactly its FLOPs


def common_budgets(curves: Sequence[Curve], n: int = 4) -> list[float]:
    """n FLOP budgets, log-spaced from the smallest to the largest final training FLOPs among the
    curves, rounded down to two significant digits: every budget is reached by at least one run, the
    smallest by all."""
    finals = [c[-1]["train_flops"] for c in curves if c and c[-1]["train_flops"] > 0]
    if not finals:
        return []
    lo, hi = math.log10(min(finals)), math.log10(max(finals))
    points = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 and hi > lo else [lo]
    return sorted({_floor_2_digits(10**p) for p in points})


def _floor_2_digits(x: float) -> float:
    """x rounded down to two significant digits: 1.269e11 -> 1.2e11."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.floor(x / unit * (1 + 1e-12)) * unit


def equal_compute_rows(named_curves: Sequence[tuple[str, Curve]], budgets: Sequence[float]
                       ) -> list[tuple[str, list[float | None]]]:
    """(name, [MSE at each budget or None]) for every curve."""
    return [(name, [mse_at(curve, b) for b in budgets]) for name, curve in named_curves]


def markdown(named_curves: Sequence[tuple[str, Curve]], budgets: Sequence[float]) -> str:
    """The equal-compute table: one row per run, one column per budget; the lowest MSE of each column
    in bold; `not reached` where a run stopped before the budget."""
    rows = equal_compute_rows(named_curves, budgets)
    best = [min((v[i] for _, v in rows if v[i] is not None), default=None) for i in range(len(budgets))]
    head = "| run | " + " | ".join(f"MSE at {b:.2g} FLOPs" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 1)]
    for name, values in rows:
        cells = ["not reached" if v is None else (f"**{v:.4g}**" if v == best[i] else f"{v:.4g}")
                 for i, v in enumerate(values)]
        lines.append(f"| {name.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flops_to_reach(curve: Curve, target: float) -> float | None:
    """The training FLOPs at which the curve first gets to a held-out MSE <= target (interpolated
    between validations), or None if it never does."""
    points = [(v["train_flops"], v["mse"]) for v in curve if v.get("mse") is not None]
    if not points:
        return None
    if points[0][1] <= target:
        return points[0][0]
    for (f0, m0), (f1, m1) in zip(points, points[1:]):
        if m1 <= target:  # and m0 > target: the crossing lies between
            return f0 + (f1 - f0) * (m0 - target) / (m0 - m1)
    return None


def findings(runs: Sequence[EvaluatedRun]) -> list[str]:
    """What the runs say about the paper's claims, as sentences (none where the runs cannot say). Runs
    compare only at the same k: the Figure 1 and equal-compute statements use the k most runs share.

    - Figure 1: the training FLOPs each expert family needs to reach the held-out MSE of the best
      dense TopK-style run (read off the validation curves), against that run's own FLOPs;
    - at equal compute: which family has the lowest MSE at each common FLOP budget;
    - same width, equal compute: each width-matched expert run against the dense run of its width
      and k, read at the expert run's final FLOPs;
    - at fixed width (width-matched runs with as many latents and the same k as a dense run): which
      final MSE is lower.
    """
    sparse = [r for r in runs if r.sae.sparse_codes]
    ks = [r.get("k") for r in sparse]
    k = max(set(ks), key=ks.count) if ks else None
    at_k = [r for r in sparse if r.get("k") == k]
    dense = [r for r in at_k if not r.sae.has_experts and r.curve]
    experts = [r for r in at_k if r.sae.has_experts and r.curve]
    out = []
    if dense and experts:
        best = min(dense, key=lambda r: r.get("mse"))
        target = best.curve[-1]["mse"]
        need = best.curve[-1]["train_flops"]
        for series in sorted({r.series for r in experts}):
            reached = [(f, r) for r in experts if r.series == series
                       if (f := flops_to_reach(r.curve, target)) is not None]
            if reached:
                f, r = min(reached, key=lambda p: p[0])
                verdict = "less" if f < need else "more"
                out.append(f"Figure 1 (compute, k={k}): {series} ({r.label}) reached the held-out MSE of the best "
                           f"{best.sae.display_name} run ({best.label}, {target:.4g} at its end) after {f:.3g} "
                           f"training FLOPs, {verdict} than that run's {need:.3g} ({need / f:.2g}x).")
            else:
                out.append(f"Figure 1 (compute, k={k}): no {series} run reached the held-out MSE of the best "
                           f"{best.sae.display_name} run ({best.label}, {target:.4g}) within its budget.")
    with_curves = [r for r in at_k if len(r.curve) > 1]
    budgets = common_budgets([r.curve for r in with_curves])
    if len({r.series for r in with_curves}) > 1 and budgets:
        winners = []
        for b in budgets:
            reached = [(m, r) for r in with_curves if (m := mse_at(r.curve, b)) is not None]
            winners.append(min(reached, key=lambda p: p[0])[1].series)
        tally = ", ".join(f"{series} at {winners.count(series)}" for series in dict.fromkeys(winners))
        out.append(f"At equal training compute (k={k}): the lowest held-out MSE among the runs that reached each "
                   f"of the {len(budgets)} common FLOP budgets ({', '.join(f'{b:.2g}' for b in budgets)}) belongs "
                   f"to {tally}.")
    dense_of = {(r.get("n_latents"), r.get("k")): r for r in sparse if not r.sae.has_experts}
    width_matched = [r for r in sparse if r.sae.has_experts and r.get("match") != "flops"]
    same = [(r, d, r.curve[-1]["mse"], m) for r in width_matched if r.curve
            and (d := dense_of.get((r.get("n_latents"), r.get("k")))) is not None and d.curve
            and (m := mse_at(d.curve, r.curve[-1]["train_flops"])) is not None]
    if same:
        lower = sum(e < m for _, _, e, m in same)
        examples = "; ".join(f"M={r.get('n_latents')} k={r.get('k')}: {d.sae.display_name} {m:.4g} vs {r.series} "
                             f"{e:.4g}" for r, d, e, m in same)
        out.append(f"Same width, equal compute: at the final training FLOPs of each width-matched expert run, its "
                   f"expert SAE had the lower held-out MSE than the dense run of the same width and k in {lower} of "
                   f"{len(same)} pairs ({examples}).")
    pairs = [(r, dense_of[(r.get("n_latents"), r.get("k"))]) for r in width_matched
             if (r.get("n_latents"), r.get("k")) in dense_of]
    if pairs:
        worse = sum(s.get("mse") > d.get("mse") for s, d in pairs)
        out.append(f"Fixed width: in {worse} of {len(pairs)} width-matched pairs (same width and k) the expert SAE has "
                   "the higher final held-out MSE than the dense one (the paper: Switch is worse at a fixed width and "
                   "better at a fixed compute).")
    return out
