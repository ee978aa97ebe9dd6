"""`python -m eval.dashboard run=<run dir> [overrides]`: feature dashboards as a static HTML site.

One pass encodes the store's held-out rows (at most `max_tokens`, outlier rows left out as in eval)
with the run's SAE and keeps every firing as a (row, feature, activation) triple (only those of
the asked-for features when `features` is a list): F triples, F ~ rows x L0. From them, per
feature: density (fraction of evaluated tokens where it fires), the top activating contexts,
random samples from each decile of its non-zero activations (deciles by rank), random contexts
where it does not fire, a histogram, and for Switch SAEs its expert (feature // expert_width).
Contexts are windows of the rows' own sequences, decoded with the store's tokenizer; every
token of a window is shaded by the feature's activation there. Rendering: eval/dashboard_html.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import harvest  # noqa: F401  (reproducible MKL settings before torch loads)

if TYPE_CHECKING:  # torch, transformers and the store load only once the input is checked
    import torch

    from eval.dashboard_html import Context, FeaturePage
    from eval.run import Run
    from harvest.store import ActivationStore

SELECTIONS = ("random", "top_density")


class DashboardError(Exception):
    """Bad input; printed as one line before any work starts."""


@dataclass(frozen=True)
class DashboardConfig:
    run: str
    out: str | None
    store: str | None
    features: str | list[int]
    n_features: int
    seed: int
    max_tokens: int
    batch_size: int
    outlier_factor: float | str | None
    n_top: int
    n_per_decile: int
    n_zero: int
    left: int
    right: int
    bins: int
    device: str
    progress: bool

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> DashboardConfig:
        if OmegaConf.is_missing(cfg, "run") or cfg.get("run") is None:
            raise DashboardError("run=<run dir> is required: a training run directory holding sae/")
        raw = OmegaConf.to_container(cfg, resolve=True)
        try:
            out = cls(**raw)  # type: ignore[arg-type]
        except TypeError as e:
            raise DashboardError(f"bad dashboard config: {e}") from None
        feats = out.features
        checks = [
            (feats in SELECTIONS or (isinstance(feats, list) and len(feats) > 0
                                     and all(isinstance(f, int) and not isinstance(f, bool) for f in feats)),
             f"features must be random, top_density or a non-empty list of indices like [1,5,9], got {feats!r}"),
            (out.n_features >= 1, f"n_features must be >= 1, got {out.n_features}"),
            (out.max_tokens >= 1 and out.batch_size >= 1, "max_tokens and batch_size must be >= 1"),
            (min(out.n_top, out.n_per_decile, out.n_zero, out.left, out.right) >= 0,
             "n_top, n_per_decile, n_zero, left and right must be >= 0"),
            (out.bins >= 1, f"bins must be >= 1, got {out.bins}"),
            (out.outlier_factor in ("run", None) or (isinstance(out.outlier_factor, (int, float))
                                                     and out.outlier_factor > 1),
             f"outlier_factor must be run, null or a number > 1, got {out.outlier_factor!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DashboardError(message)
        return out


@dataclass
class Firings:
    """Every firing seen in the encoding pass, sorted by (feature, row).

    rows [F] int64 global store rows, feats [F] int64, acts [F] float32; seen [n] int64: the
    evaluated rows (ascending), n = the number of evaluated tokens.
    """

    rows: np.ndarray
    feats: np.ndarray
    acts: np.ndarray
    seen: np.ndarray

    def of(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n_f] ascending, acts [n_f]) of feature f."""
        lo, hi = np.searchsorted(self.feats, [f, f + 1])
        return self.rows[lo:hi], self.acts[lo:hi]


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def collect(run: Run, cfg: DashboardConfig, only: list[int] | None, device: torch.device) -> Firings:
    """Encode the held-out rows and keep the firings of `only` (None: all)."""
    import torch
    from tqdm import tqdm

    from train.loader import outliers

    store, sae = run.store, run.sae
    keep = torch.tensor(sorted(only), device=device) if only is not None else None
    rows_l, feats_l, acts_l, seen_l = [], [], [], []
    n = 0
    bar = tqdm(total=min(cfg.max_tokens, len(run.held) * store.chunk_rows), unit="tok", desc="encode",
               disable=not cfg.progress)
    for i in run.held:
        if n >= cfg.max_tokens:
            break
        x = store.read_chunk(i)
        ids = i * store.chunk_rows + np.flatnonzero(~outliers(x, "float32", run.cut))[: cfg.max_tokens - n]
        x = x[ids - i * store.chunk_rows]
        for s in range(0, len(x), cfg.batch_size):
            xb = torch.from_numpy(x[s : s + cfg.batch_size]).to(device)
            with torch.inference_mode():
                codes = sae.encode(xb)
            if codes.dense is not None:
                dense = codes.dense if keep is None else codes.dense[:, keep]
                r, j = torch.nonzero(dense > 0, as_tuple=True)
                v, f = dense[r, j], (j if keep is None else keep[j])
            else:
                mask = codes.vals > 0 if keep is None else (codes.vals > 0) & torch.isin(codes.idx, keep)
                r, j = torch.nonzero(mask, as_tuple=True)
                v, f = codes.vals[r, j], codes.idx[r, j]
            rows_l.append(ids[s:][r.cpu().numpy()])
            feats_l.append(f.cpu().numpy().astype(np.int64))
            acts_l.append(v.float().cpu().numpy())
            bar.update(len(xb))
        seen_l.append(ids)
        n += len(ids)
    bar.total = n  # outlier rows left out
    bar.refresh()
    bar.close()
    rows, feats, acts = _cat(rows_l, np.int64), _cat(feats_l, np.int64), _cat(acts_l, np.float32)
    order = np.lexsort((rows, feats))
    return Firings(rows[order], feats[order], acts[order], _cat(seen_l, np.int64))


def choose(firings: Firings, cfg: DashboardConfig, n_latents: int) -> list[int]:
    """The features to show: the configured list, or n_features alive ones (random or densest)."""
    if isinstance(cfg.features, list):
        return list(dict.fromkeys(cfg.features))
    counts = np.bincount(firings.feats, minlength=n_latents)
    alive = np.flatnonzero(counts)
    if cfg.features == "top_density":
        return alive[np.argsort(-counts[alive], kind="stable")][: cfg.n_features].tolist()
    picked = np.random.default_rng(cfg.seed).choice(alive, size=min(cfg.n_features, len(alive)), replace=False)
    return sorted(picked.tolist())


class Contexts:
    """Turns (row, feature) into a highlighted window of the row's sequence."""

    def __init__(self, store: ActivationStore, tokenizer: Any, left: int, right: int):
        self.store, self.left, self.right = store, left, right
        self.rps, self.first = store.attrs["rows_per_seq"], store.attrs["first_pos"]
        cs = store.chunk_rows // self.rps  # sequences per chunk: read the contexts a chunk at a time
        self.block = lru_cache(maxsize=64)(lambda c: np.asarray(store.contexts[c * cs : (c + 1) * cs]))
        self.cs = cs
        self.decode = lru_cache(maxsize=None)(
            lambda t: tokenizer.decode([t], clean_up_tokenization_spaces=False))

    def __call__(self, row: int, f_rows: np.ndarray, f_acts: np.ndarray) -> Context:
        """f_rows [n_f] ascending, f_acts [n_f]: the feature's firings -> a dashboard_html.Context."""
        from eval.dashboard_html import Context

        seq, pos = divmod(int(row), self.rps)  # as ActivationStore.context(row), one chunk read per chunk
        ids, pos = self.block(seq // self.cs)[seq % self.cs], pos + self.first
        lo, hi = max(0, pos - self.left), min(len(ids), pos + self.right + 1)
        win_rows = seq * self.rps + np.arange(lo, hi) - self.first  # store rows of the window's positions
        acts = np.zeros(hi - lo)
        if len(f_rows):
            at = np.minimum(np.searchsorted(f_rows, win_rows), len(f_rows) - 1)
            hit = (win_rows >= seq * self.rps) & (f_rows[at] == win_rows)  # position 0 has no row
            acts[hit] = f_acts[at[hit]]
        return Context([self.decode(int(t)) for t in ids[lo:hi]], acts.tolist(), pos - lo, float(acts[pos - lo]),
                       int(row))


def feature(f: int, firings: Firings, ctx: Contexts, cfg: DashboardConfig, expert_width: int | None) -> FeaturePage:
    """The dashboard_html.FeaturePage of feature f."""
    from eval.dashboard_html import FeaturePage

    rows, acts = firings.of(f)
    rng = np.random.default_rng([cfg.seed, f])
    by_act = np.argsort(-acts, kind="stable")  # strongest first, ties in row order
    top = [ctx(rows[i], rows, acts) for i in by_act[: cfg.n_top]]
    deciles = []
    ranked = by_act[::-1]  # ascending activation
    for d in range(9, -1, -1):
        part = ranked[len(ranked) * d // 10 : len(ranked) * (d + 1) // 10]
        if len(part):
            pick = rng.choice(part, size=min(cfg.n_per_decile, len(part)), replace=False)
            pick = pick[np.argsort(-acts[pick], kind="stable")]
            label = f"decile {d + 1} of 10: activations {acts[part].min():.4g} .. {acts[part].max():.4g}"
            deciles.append((label, [ctx(rows[i], rows, acts) for i in pick]))
    quiet = np.setdiff1d(firings.seen, rows, assume_unique=True)
    zero = sorted(rng.choice(quiet, size=min(cfg.n_zero, len(quiet)), replace=False).tolist())
    max_act = float(acts.max()) if len(acts) else 0.0
    counts, edges = np.histogram(acts, bins=cfg.bins, range=(0.0, max_act or 1.0))
    n = max(len(firings.seen), 1)
    return FeaturePage(f, f // expert_width if expert_width else None, len(rows) / n, len(rows), max_act, top,
                       deciles, [ctx(r, rows, acts) for r in zero], counts.tolist(), edges.tolist())


def build_dashboard(cfg: DashboardConfig) -> Path:
    """Check everything, encode, write the site; returns the path of index.html."""
    run_dir = Path(cfg.run)
    if not run_dir.is_dir():
        raise DashboardError(f"run {run_dir} does not exist")
    if not (run_dir / "sae" / "sae.json").exists():
        raise DashboardError(f"run {run_dir} has no trained SAE: expected {run_dir}/sae/sae.json")
    from transformers import AutoTokenizer  # torch and transformers load only once the run exists

    from eval.dashboard_html import feature_page, index_page
    from eval.run import EvalConfig, EvalError, open_run
    from harvest.config import HarvestError
    from harvest.lm import load_config, pick_device

    try:
        device = pick_device(cfg.device)
        as_eval = EvalConfig(run=cfg.run, store=cfg.store, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                             dead_window=None, outlier_factor=cfg.outlier_factor, ce=False, ce_seqs=1, ce_batch=1,
                             redo=True, device=cfg.device, dtype="float32", progress=cfg.progress)
        run = open_run(run_dir, as_eval, device)
    except (EvalError, HarvestError) as e:
        raise DashboardError(str(e)) from None
    m = run.sae.n_latents
    if isinstance(cfg.features, list):
        bad = [f for f in cfg.features if not 0 <= f < m]
        if bad:
            raise DashboardError(f"feature {bad[0]} out of range: the SAE has {m} latents (0..{m - 1})")
    name = run.store.attrs.get("tokenizer") or run.store.attrs["model"]
    try:
        load_config(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # HarvestError or whatever transformers raises
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DashboardError(f"cannot load the tokenizer of {name!r} ({first})") from None
    out = Path(cfg.out) if cfg.out else run_dir / "dashboard"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DashboardError(f"cannot create output folder {out}: {e.strerror}") from None

    firings = collect(run, cfg, cfg.features if isinstance(cfg.features, list) else None, device)
    chosen = choose(firings, cfg, m)
    ctx = Contexts(run.store, tokenizer, cfg.left, cfg.right)
    pages = [feature(f, firings, ctx, cfg, getattr(run.sae, "expert_width", None)) for f in chosen]
    source = f"{run_dir} ({run.sae.arch}, {m} latents)"
    for p in pages:
        (out / p.filename).write_text(feature_page(p, source, len(firings.seen)), encoding="utf-8")
    alive = len(np.unique(firings.feats))
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
    try:
        index = build_dashboard(DashboardConfig.from_omegaconf(cfg))
    except DashboardError as e:
        print(f"dashboard: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"dashboard: {index}")


if __name__ == "__main__":
    main()
