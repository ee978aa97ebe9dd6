"""`python -m eval.dashboard run=<run dir> [overrides]`: feature dashboards as a static HTML site.

One pass (eval/firings.py `scan`) encodes the store's held-out rows (exactly the first `max_tokens`,
outlier rows left out as in eval) with the run's SAE and keeps every firing as a (row, feature,
activation) triple (only those of the asked-for features when `features` is a list): F triples,
F ~ rows x L0. From them, per feature: density (fraction of evaluated tokens where it fires), the
top activating contexts, random samples from each decile of its non-zero activations (deciles by
rank, eval/firings.py `deciles`), random contexts where it does not fire, a histogram, and for Switch
SAEs its expert (the SAE layout's `expert_of`). Contexts are windows of the rows' own sequences, decoded
with the store's tokenizer; every token of a window is shaded by the feature's activation there.
Rendering: eval/dashboard_html.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from eval.firings import Firings, choose, deciles, open_run, scan, top, values_at, window
from eval.options import PATH, HeldOutOptions
from runtime.cli import launch
from runtime.config import NULL, Rule, integer, list_of, one_of
from runtime.errors import ToolkitError, one_line_errors, reraise_as

if TYPE_CHECKING:  # torch, transformers and the store load only once the input is checked
    from eval.dashboard_html import Context, FeaturePage
    from harvest.store import ActivationStore
    from train.saes.base import Layout

SELECTIONS = ("random", "top_density")


class DashboardError(ToolkitError):
    """Bad input; printed as one line before any work starts."""


@dataclass(frozen=True)
class DashboardConfig(HeldOutOptions):
    """conf/eval/dashboard.yaml (every key documented there)."""

    out: str | None
    features: str | list[int]
    n_features: int
    seed: int
    n_top: int
    n_per_decile: int
    n_zero: int
    left: int
    right: int
    bins: int

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> DashboardConfig:
        """The typed config of a composed conf/eval/dashboard.yaml, every value checked; DashboardError."""
        return cls.compose(cfg, DashboardError, "dashboard",
                           "run=<run dir> is required: a training run directory holding sae/", RULES)


# the keys of conf/eval/dashboard.yaml besides eval.options.HELD_OUT_RULES' (documented there), and their values
RULES: dict[str, Rule] = {
    "out": PATH | NULL,
    "features": (one_of(*SELECTIONS) | list_of(integer(0), "")).saying(
        f"{', '.join(SELECTIONS)} or a non-empty list of feature indices >= 0 like [1,5,9]"),
    "n_features": integer(1),
    "seed": integer(0),
    "n_top": integer(0),
    "n_per_decile": integer(0),
    "n_zero": integer(0),
    "left": integer(0),
    "right": integer(0),
    "bins": integer(1),
}


class Contexts:
    """Turns (row, feature) into a highlighted window of the row's sequence."""

    def __init__(self, store: ActivationStore, tokenizer: Any, left: int, right: int):
        self.store, self.left, self.right = store, left, right
        self.decode = lru_cache(maxsize=None)(
            lambda t: tokenizer.decode([t], clean_up_tokenization_spaces=False))

    def __call__(self, row: int, f_rows: np.ndarray, f_acts: np.ndarray) -> Context:
        """f_rows [n_f] ascending, f_acts [n_f]: the feature's firings -> a dashboard_html.Context."""
        from eval.dashboard_html import Context

        ids, rows, center = window(self.store, row, self.left, self.right)
        acts = values_at(rows, f_rows, f_acts)
        return Context([self.decode(int(t)) for t in ids], acts.tolist(), center, float(acts[center]), int(row))


def feature(f: int, firings: Firings, ctx: Contexts, cfg: DashboardConfig, layout: Layout) -> FeaturePage:
    """The dashboard_html.FeaturePage of feature f."""
    from eval.dashboard_html import FeaturePage

    rows, acts = firings.of(f)
    rng = np.random.default_rng([cfg.seed, f])
    strongest = [ctx(rows[i], rows, acts) for i in top(ctx.store, rows, acts, cfg.n_top)]
    samples = []
    for d, (part, pick) in reversed(list(enumerate(deciles(acts, cfg.n_per_decile, rng), start=1))):
        if len(part):
            pick = pick[np.argsort(-acts[pick], kind="stable")]
            label = f"decile {d} of 10: activations {acts[part].min():.4g} .. {acts[part].max():.4g}"
            samples.append((label, [ctx(rows[i], rows, acts) for i in pick]))
    quiet = np.setdiff1d(firings.seen, rows, assume_unique=True)
    zero = sorted(rng.choice(quiet, size=min(cfg.n_zero, len(quiet)), replace=False).tolist())
    max_act = float(acts.max()) if len(acts) else 0.0
    counts, edges = np.histogram(acts, bins=cfg.bins, range=(0.0, max_act or 1.0))
    n = max(len(firings.seen), 1)
    return FeaturePage(f, layout.expert_of(f), len(rows) / n, len(rows), max_act, strongest,
                       samples, [ctx(r, rows, acts) for r in zero], counts.tolist(), edges.tolist())


def build_dashboard(cfg: DashboardConfig) -> Path:
    """Check everything, encode, write the site; returns the path of index.html."""
    from eval.dashboard_html import feature_page, index_page

    run_dir = Path(cfg.run)
    with reraise_as(DashboardError):
        run, tokenizer, device = open_run(cfg.run, cfg.store, cfg.outlier_factor, cfg.device)
    m = run.sae.n_latents
    if isinstance(cfg.features, list):
        bad = [f for f in cfg.features if not 0 <= f < m]
        if bad:
            raise DashboardError(f"feature {bad[0]} out of range: the SAE has {m} latents (0..{m - 1})")
    out = Path(cfg.out) if cfg.out else run.dir.file(run.dir.DASHBOARD)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DashboardError(f"cannot create output folder {out}: {e.strerror}") from None

    firings = scan(run, device, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, whole_chunks=False,
                   only=cfg.features if isinstance(cfg.features, list) else None, progress=cfg.progress)
    chosen = choose(firings.counts, cfg.features, cfg.n_features, cfg.seed)
    ctx = Contexts(run.store, tokenizer, cfg.left, cfg.right)
    pages = [feature(f, firings, ctx, cfg, run.sae.layout()) for f in chosen]
    source = f"{run_dir} ({run.sae.arch}, {m} latents)"
    run.dir.writer_lock(f"run {run.dir}", DashboardError).check()  # not while a launch replaces its weights
    for p in pages:
        (out / p.filename).write_text(feature_page(p, source, len(firings.seen)), encoding="utf-8")
    alive = len(np.unique(firings.latents))
    how = "as listed" if isinstance(cfg.features, list) else f"{cfg.features}, seed {cfg.seed}"
    summary = (f"{run.sae.arch} SAE, {m} latents, on {len(firings.seen)} held-out tokens of {run.store.path}; "
               f"{len(pages)} features shown ({how}); {alive} of the "
               f"{len(chosen) if isinstance(cfg.features, list) else m} features fire at least once")
    index = out / "index.html"
    index.write_text(index_page(pages, f"Feature dashboard: {run_dir.name}", summary), encoding="utf-8")
    return index


@hydra.main(config_path="../conf/eval", config_name="dashboard", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `dashboard: error: ...` and exit 2 on bad input."""
    with one_line_errors("dashboard"):
        index = build_dashboard(DashboardConfig.from_omegaconf(cfg))
    print(f"dashboard: {index}")


if __name__ == "__main__":
    launch("dashboard", main, DashboardConfig.from_omegaconf, conf="eval")
