"""Feature geometry of trained SAEs (paper section 4.3, Figures 4 and 5).

    python -m eval.geometry run=<run dir>         # or run=[runs/switch,runs/topk] (conf/eval/geometry.yaml)

Per run: geometry.json, geometry_nn_cos.png (nearest-neighbour cosine histograms of decoder and encoder
features, Fig. 4a-b), for Switch runs geometry_experts.png (expert x expert mean nearest-neighbour cosine
next to a baseline of random equal-size blocks, Fig. 4c) and the redundancy block (`redundancy`: overlap
between experts against random directions, and co-firing of near-duplicates on held-out tokens), and
geometry_tsne.png (Fig. 5). With several
runs also geometry_compare.png (their histograms overlaid).

Shapes: M features, d input dims, N experts of e features each (M = N e). Features are rows of W_dec /
W_enc (W_gate for Gated), compared after scaling each row to unit norm. Cosines are computed `block` rows
at a time against all M rows (memory ~ block x M x 4 bytes); no [M, M] matrix is ever built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from eval.firings import encode_rows
from eval.plots import figure, save_png
from runtime.config import (DEVICE, FLAG, NULL, Rule, check_values, instantiate, integer, list_of, number,
                            require_given, text)
from runtime.device import pick_device
from runtime.cli import launch
from runtime.errors import ToolkitError, one_line_errors, reraise_as
from runtime.files import write_text
from train.run_dir import RunDir
from train.saes import REGISTRY, SAE
from train.saes.base import CONFIG_FILE

MATRICES = ("decoder", "encoder")
COFIRE_BATCH = 4096  # held-out rows encoded at a time for the co-firing count


class GeometryError(ToolkitError):
    """Bad input; printed as one line before any work starts."""


# ------------------------------------------------------------------------------------------ math

def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """[..., d] -> float32 copy with every row at unit norm (all-zero rows stay zero)."""
    w = w.detach().float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def group_max(w: torch.Tensor, groups: int, block: int) -> torch.Tensor:
    """w [M, d], rows in `groups` consecutive groups of M / groups -> [M, groups]: each row's max cosine
    to the rows of each group, the row itself excluded (-inf for a group holding no other row)."""
    m = w.shape[0]
    if groups < 1 or m % groups:
        raise ValueError(f"{m} rows do not split into {groups} equal groups")
    w = unit_rows(w)
    out = torch.empty(m, groups, device=w.device)
    for start in range(0, m, block):
        sims = w[start:start + block] @ w.T  # [b, M]
        r = torch.arange(len(sims), device=w.device)
        sims[r, start + r] = -torch.inf
        out[start:start + len(sims)] = sims.view(len(sims), groups, m // groups).amax(-1)
        del sims  # freed before the next block is allocated: peak ~ one block x M
    return out


def nn_cosine(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [M, d] -> [M]: each feature's max cosine to any OTHER feature."""
    return group_max(w, 1, block)[:, 0]


def expert_matrix(gmax: torch.Tensor) -> torch.Tensor:
    """group_max output [M, N] of N equal experts -> [N, N]: (A, B) = mean over the features of expert A
    of their max cosine to a feature of B (NaN on the diagonal when experts have one feature)."""
    n = gmax.shape[1]
    mat = gmax.view(n, -1, n).mean(1)
    return torch.where(torch.isfinite(mat), mat, torch.nan)


def expert_similarity(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [N, e, d] -> [N, N] mean nearest-neighbour cosine of expert A's features within expert B
    (for A == B each feature's own row is excluded)."""
    n, e, d = w.shape
    return expert_matrix(group_max(w.reshape(n * e, d), n, block))


def cross_expert_max(gmax: torch.Tensor) -> torch.Tensor:
    """group_max output [M, N] -> [M]: each feature's max cosine to a feature of ANOTHER expert."""
    m, n = gmax.shape
    own = torch.arange(m, device=gmax.device) // (m // n)
    return gmax.scatter(1, own[:, None], -torch.inf).amax(1)


@torch.no_grad()
def cross_expert_partner(w: torch.Tensor, groups: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, d], rows in `groups` equal experts -> (each row's max cosine to a row of ANOTHER expert [M], that
    row's index [M])."""
    m = w.shape[0]
    w = unit_rows(w)
    size = m // groups
    best, partner = torch.empty(m, device=w.device), torch.empty(m, dtype=torch.long, device=w.device)
    for start in range(0, m, block):
        sims = w[start:start + block] @ w.T  # [b, M]
        own = (torch.arange(start, start + len(sims), device=w.device) // size)[:, None]
        sims.masked_fill_(torch.arange(m, device=w.device)[None] // size == own, -torch.inf)
        best[start:start + len(sims)], partner[start:start + len(sims)] = sims.max(1)
        del sims
    return best, partner


def overlap_excess(observed: float, random: float) -> float:
    """How far the mean cross-expert overlap lies from random directions' towards 1 (all duplicated):
    (observed - random) / (1 - random); 0 = as random directions, 1 = every feature has an exact copy in
    another expert, below 0 = experts further apart than random."""
    return (observed - random) / (1 - random)


@torch.no_grad()
def cofiring(rows: torch.Tensor, latents: torch.Tensor, pairs: torch.Tensor, n_latents: int) -> dict[str, Any]:
    """Firings (row [F], latent [F]) of a sample of tokens and near-duplicate pairs [P, 2] (latent, partner)
    -> how often a duplicated latent fires on a token where its partner fires too:
    cofire = sum over pairs of #tokens where both fire / #tokens where the latent fires, and the share of all
    firings that are by a latent with a near-duplicate in another expert."""
    keys = rows * n_latents + latents
    fired = torch.unique(keys)  # sorted
    partner = torch.full((n_latents,), -1, dtype=torch.long, device=latents.device)
    partner[pairs[:, 0]] = pairs[:, 1]
    dup = partner[latents] >= 0
    both = torch.isin(rows[dup] * n_latents + partner[latents[dup]], fired)
    n_dup = int(dup.sum())
    return {"firings": len(keys), "duplicate_firings": n_dup, "duplicate_firing_share": n_dup / max(len(keys), 1),
            "cofire": int(both.sum()) / n_dup if n_dup else None}


def feature_vectors(sae: SAE, m: int) -> dict[str, torch.Tensor]:
    """{"decoder": the decoder directions, "encoder": the encoder directions (W_gate's rows for gated)},
    each the first m rows [m, d] of the architecture's [M, d] (the SAE contract, train/saes/base.py)."""
    return {"decoder": sae.decoder_directions()[:m], "encoder": sae.encoder_directions()[:m]}


def summary(nn: torch.Tensor, threshold: float) -> dict[str, Any]:
    """nn [M] nearest-neighbour cosines -> mean, quantiles and the fraction above `threshold`."""
    v = nn.double().cpu()
    p05, p50, p95 = np.quantile(v.numpy(), [0.05, 0.5, 0.95]).tolist()
    n_dup = int((v > threshold).sum())
    return {"nn_cos_mean": v.mean().item(), "nn_cos_median": p50, "nn_cos_p05": p05, "nn_cos_p95": p95,
            "dup_frac": n_dup / len(v), "n_dup": n_dup}


def within_between(mat: torch.Tensor) -> dict[str, float]:
    """[N, N] expert matrix -> mean of the diagonal (within expert) and of the off-diagonal entries."""
    eye = torch.eye(len(mat), dtype=torch.bool, device=mat.device)
    between = mat[~eye].nanmean().item() if len(mat) > 1 else float("nan")
    return {"within_expert": mat.diagonal().nanmean().item(), "between_experts": between}


EXACT_TSNE = 500  # up to this many points the exact t-SNE gradient is faster than Barnes-Hut


def tsne_embed(x: torch.Tensor, perplexity: float, pca: int, seed: int, max_iter: int) -> np.ndarray:
    """x [n, d] -> [n, 2] t-SNE embedding (after PCA to `pca` dims when 0 < pca < d)."""
    from sklearn.manifold import TSNE

    x = x.detach().float().cpu()
    if 0 < pca < min(x.shape):
        x = x - x.mean(0)
        x = x @ torch.linalg.svd(x, full_matrices=False).Vh[:pca].T
    method = "exact" if len(x) <= EXACT_TSNE else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", method=method,
                max_iter=max_iter, random_state=seed).fit_transform(x.numpy())


# ----------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class GeometryConfig:
    run: list[str]
    out: str | None
    threshold: float
    block: int
    topk_run: str | None
    seed: int
    bins: int
    tsne: bool
    tsne_samples: int
    tsne_perplexity: float
    tsne_pca: int
    tsne_iter: int
    cofire_tokens: int
    device: str

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> GeometryConfig:
        """The typed config of a composed conf/eval/geometry.yaml, every value checked (RULES)."""
        require_given(cfg, "run", GeometryError, "run=<dir> is required: a run directory (holding sae/) or a list "
                      "run=[a,b]")
        raw = OmegaConf.to_container(cfg, resolve=True)
        check_values(raw, RULES, GeometryError, "conf/eval/geometry.yaml")
        raw["run"] = [raw["run"]] if isinstance(raw["run"], str) else raw["run"]
        return instantiate(cls, raw, GeometryError, "geometry")


# every key of conf/eval/geometry.yaml (documented there) and what its value must be
PATH = text("a path")
RULES: dict[str, Rule] = {
    "run": PATH | list_of(PATH, "a non-empty list of paths"),
    "out": PATH | NULL,
    "threshold": number(0, 1, lo_open=True),
    "block": integer(1),
    "topk_run": PATH | NULL,
    "seed": integer(0),
    "bins": integer(1),
    "tsne": FLAG,
    "tsne_samples": integer(2),
    "tsne_perplexity": number(0, lo_open=True),
    "tsne_pca": integer(0),
    "tsne_iter": integer(250),  # sklearn's TSNE refuses fewer steps
    "cofire_tokens": integer(0),
    "device": DEVICE,
}


@dataclass
class Target:
    """One run to analyse: where it is, where its outputs go and its SAE's shape (its layout, from sae.json):
    m latents analysed (with experts the N e routed ones, else all M), d, N experts (None: no router)."""

    dir: Path
    out: Path
    arch: str
    m: int
    d: int
    n_experts: int | None


def _read_run(path: str, what: str) -> Target:
    """Check that `path` is a run with a readable sae/sae.json; its shape without loading weights."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GeometryError(f"{what} {p} is not a directory")
    run = RunDir(p)
    with reraise_as(GeometryError):
        run.check_trained(what)
    meta_file = p / RunDir.SAE / CONFIG_FILE
    with reraise_as(GeometryError):
        config = run.sae_config()
    arch = config.pop("arch", None)
    if arch not in REGISTRY:
        raise GeometryError(f"{meta_file}: unknown arch {arch!r}; expected one of {', '.join(sorted(REGISTRY))}")
    try:
        layout = REGISTRY[arch].layout_of(config)
    except (ValueError, TypeError) as e:
        raise GeometryError(f"{meta_file} is not a valid sae.json ({type(e).__name__}: {e})") from None
    # with experts, the routed latents (a shared expert's are in none); else every latent
    m = layout.routed or layout.n_latents
    return Target(p, p, arch, m, layout.d, layout.n_experts or None)


def plan(cfg: GeometryConfig) -> tuple[list[Target], Target | None, Path | None]:
    """Check every input before any work: (runs with their output dirs, the TopK baseline run or None,
    where the comparison plot goes or None for a single run)."""
    targets = [_read_run(r, "run") for r in cfg.run]
    seen: dict[Path, str] = {}
    for t in targets:
        key = t.dir.resolve()
        if key in seen:
            raise GeometryError(f"run {t.dir} is given twice (also as {seen[key]})")
        seen[key] = str(t.dir)
    if cfg.out is not None:
        names = [t.dir.resolve().name for t in targets]
        clash = sorted({n for n in names if names.count(n) > 1})
        if len(targets) > 1 and clash:
            raise GeometryError(f"runs share the folder name {clash[0]!r}, so out={cfg.out} cannot hold them apart; "
                                "leave out=null to write into each run")
        for t, name in zip(targets, names, strict=False):
            t.out = Path(cfg.out) / name if len(targets) > 1 else Path(cfg.out)
    base = _read_run(cfg.topk_run, "topk_run") if cfg.topk_run is not None else None
    if base is not None:
        if base.n_experts:
            raise GeometryError(f"topk_run {base.dir} is a {base.arch} run; the baseline needs a single-dictionary "
                                "SAE (topk)")
        for t in targets:
            if t.n_experts and (t.m, t.d) != (base.m, base.d):
                raise GeometryError(f"topk_run {base.dir} has M={base.m}, d={base.d} but {t.arch} run {t.dir} has "
                                    f"M={t.m}, d={t.d}: the baseline needs the same total width and d")
    if cfg.cofire_tokens:  # the stores the redundancy block reads, reachable before any work
        for t in targets:
            run = RunDir(t.dir)
            if t.n_experts and run.has_config:
                with reraise_as(GeometryError):
                    run.open(torch.device("cpu"))
    compare = None
    if len(targets) > 1:
        compare = Path(cfg.out) if cfg.out is not None else Path(os.path.commonpath([t.dir.resolve() for t in targets]))
    return targets, base, compare


# ----------------------------------------------------------------------------------------- output

def _save(fig: Any, path: Path) -> None:
    save_png(fig, path, dpi=110)


def _figure(cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure with 1 x cols axes."""
    fig, axes = figure(1, cols, size)
    return fig, axes[0]


def plot_hist(series: dict[str, dict[str, np.ndarray]], threshold: float, bins: int, path: Path) -> None:
    """Histograms of nearest-neighbour cosine (fraction of features), decoder and encoder panels;
    series: label -> {"decoder": [M], "encoder": [M]}."""
    fig, axes = _figure(2, (10, 3.8))
    finite = [v[np.isfinite(v)] for s in series.values() for v in s.values()]
    lo = min([0.0] + [float(v.min()) for v in finite if len(v)])
    edges = np.linspace(lo, 1.0, bins + 1)
    for ax, matrix in zip(axes, MATRICES, strict=False):
        for label, s in series.items():
            v = np.clip(s[matrix][np.isfinite(s[matrix])], lo, 1.0)  # float error can put an exact copy at 1 + 1e-7
            ax.hist(v, bins=edges, weights=np.full(len(v), 1 / max(len(v), 1)), histtype="step", lw=1.4,
                    label=f"{label} (mean {v.mean():.3f})" if len(v) else label)
        ax.axvline(threshold, color="0.3", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_xlabel(f"{matrix}: max cosine to another feature")
        ax.set_ylabel("fraction of features")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_experts(panels: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Heatmaps of [N, N] expert matrices side by side, one colour scale."""
    fig, axes = _figure(len(panels), (4.6 * len(panels), 4.2))
    vals = np.concatenate([m[np.isfinite(m)].ravel() for _, m in panels] + [np.zeros(0)])
    vmin, vmax = (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 1.0)
    for ax, (title, mat) in zip(axes, panels, strict=False):
        im = ax.imshow(mat, vmin=vmin, vmax=vmax, cmap="viridis")
        if len(mat) <= 16:
            for (i, j), v in np.ndenumerate(mat):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")
        if len(mat) <= 32:
            ax.set_xticks(range(len(mat)))
            ax.set_yticks(range(len(mat)))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert B")
        ax.set_ylabel("expert A")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="mean max cosine of A's features to B's")
    _save(fig, path)


def plot_tsne(emb: dict[str, np.ndarray], expert: np.ndarray | None, title: str, path: Path) -> None:
    """Scatter of [n, 2] embeddings per matrix, coloured by expert (one colour without experts)."""
    import matplotlib

    fig, axes = _figure(len(emb), (5.2 * len(emb), 4.8))
    n = int(expert.max()) + 1 if expert is not None else 0
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    for ax, (matrix, xy) in zip(axes, emb.items(), strict=False):
        if expert is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.6, color="C0")
        else:
            for i in range(n):
                sel = expert == i
                ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.7, color=cmap(i / max(n - 1, 1) if n > 20 else i),
                           label=f"expert {i}")
            if n <= 16:
                ax.legend(fontsize=6, markerscale=3, loc="best")
        ax.set_title(f"{title}: {matrix} features", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


def _clean(x: Any) -> Any:
    """Non-finite floats -> None, so that geometry.json is strict JSON."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------- driver

def _baseline(base: Target | None, n: int, e: int, d: int, cfg: GeometryConfig,
              device: torch.device) -> tuple[str, torch.Tensor]:
    """(label, [N, N] expert matrix) of random equal-size blocks of the TopK run's decoder, or of
    random unit vectors [N, e, d] when there is no TopK run."""
    g = torch.Generator().manual_seed(cfg.seed + 0x9E3779B9)  # not the stream of a model initialised with `seed`
    if base is None:
        w, label = torch.randn(n * e, d, generator=g), "random unit vectors (no topk_run given)"
    else:
        w = RunDir(base.dir).load_sae("cpu").decoder_directions().detach()
        w, label = w[torch.randperm(len(w), generator=g)], f"random blocks of {base.arch} run {base.dir.name}"
    return label, expert_similarity(w.to(device).view(n, e, d), cfg.block)


@torch.no_grad()
def analyse(t: Target, cfg: GeometryConfig, base: Target | None, device: torch.device,
            cache: dict[tuple[int, int, int], tuple[str, torch.Tensor]],
            ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Everything for one run: writes its PNGs and geometry.json; returns (the json dict, nn cosines)."""
    sae = RunDir(t.dir).load_sae(device)
    vecs = feature_vectors(sae, t.m)
    result: dict[str, Any] = {"run": str(t.dir), "arch": t.arch, "n_latents": t.m, "d": t.d, "n_experts": t.n_experts,
                              "threshold": cfg.threshold}
    nns: dict[str, np.ndarray] = {}
    files = [RunDir.GEOMETRY, "geometry_nn_cos.png"]
    for matrix, w in vecs.items():
        gmax = group_max(w.reshape(t.m, t.d), t.n_experts or 1, cfg.block)
        nn = gmax.amax(1)
        entry = summary(nn, cfg.threshold)
        entry["zero_rows"] = int((w.reshape(t.m, t.d).norm(dim=-1) == 0).sum())
        if t.n_experts:
            cross = cross_expert_max(gmax)  # -inf everywhere for a single expert
            mat = expert_matrix(gmax)
            entry.update(cross_expert_dup_frac=int((cross > cfg.threshold).sum()) / t.m,
                         cross_expert_nn_cos_mean=cross.mean().item(), **within_between(mat),
                         expert_similarity=mat.cpu().tolist())
        result[matrix] = entry
        nns[matrix] = nn.cpu().numpy()
    dec = result["decoder"]
    result.update(nn_cos_mean=dec["nn_cos_mean"], dup_frac=dec["dup_frac"],
                  cross_expert_dup_frac=dec.get("cross_expert_dup_frac"), baseline=None, redundancy=None, tsne=None)
    plot_hist({t.dir.name: nns}, cfg.threshold, cfg.bins, t.out / "geometry_nn_cos.png")
    if t.n_experts:
        n, e = t.n_experts, t.m // t.n_experts
        key = (n, e, t.d)
        if key not in cache:
            cache[key] = _baseline(base, n, e, t.d, cfg, device)
        label, bmat = cache[key]
        result["baseline"] = {"kind": label, **within_between(bmat), "expert_similarity": bmat.cpu().tolist()}
        result["redundancy"] = redundancy(t, sae, vecs["decoder"], cfg, device)
        plot_experts([(f"{t.dir.name}: switch decoder", np.array(dec["expert_similarity"], dtype=float)),
                      (f"baseline: {label}", bmat.cpu().numpy())], t.out / "geometry_experts.png")
        files.append("geometry_experts.png")
    if cfg.tsne:
        n_s = min(cfg.tsne_samples, t.m)
        idx = torch.randperm(t.m, generator=torch.Generator().manual_seed(cfg.seed))[:n_s].sort().values
        perplexity = min(float(cfg.tsne_perplexity), (n_s - 1) / 3)
        emb = {matrix: tsne_embed(unit_rows(w.reshape(t.m, t.d))[idx.to(device)], perplexity, cfg.tsne_pca,
                                  cfg.seed, cfg.tsne_iter) for matrix, w in vecs.items()}
        expert = (idx // (t.m // t.n_experts)).numpy() if t.n_experts else None
        plot_tsne(emb, expert, t.dir.name, t.out / "geometry_tsne.png")
        result["tsne"] = {"samples": n_s, "perplexity": perplexity, "pca": cfg.tsne_pca, "iterations": cfg.tsne_iter,
                          "method": "exact" if n_s <= EXACT_TSNE else "barnes_hut", "seed": cfg.seed}
        files.append("geometry_tsne.png")
    result.update(files=files, block=cfg.block, device=str(device),
                  notes=["cosines of rows scaled to unit norm; a feature's own row is excluded",
                         f"dup_frac: fraction of features whose nearest neighbour has cosine > {cfg.threshold:g}"])
    result = _clean(result)
    RunDir(t.dir).writer_lock(f"run {t.dir}", GeometryError).check()  # not while a launch replaces its weights
    t.out.mkdir(parents=True, exist_ok=True)
    write_text(t.out / RunDir.GEOMETRY, json.dumps(result, indent=2) + "\n")
    return result, nns


@torch.no_grad()
def redundancy(t: Target, sae: SAE, w: torch.Tensor, cfg: GeometryConfig, device: torch.device) -> dict[str, Any]:
    """Features duplicated across the experts of a routed run, measured two ways that do not rest on the
    cosine threshold alone (the "redundancy" block of geometry.json):

    overlap         each decoder feature's max cosine to a feature of another expert, averaged; next to
                    the same for random unit directions of the same shape (seeded) and `excess`, where the
                    run lies between the two (0 random, 1 every feature duplicated; `overlap_excess`)
    near-duplicates pairs (feature, its nearest feature in another expert) above the threshold, and how
                    often both fire on the same held-out token (`cofiring`, over `cofire_tokens` rows):
                    with one expert per token they cannot (they sit in different experts); with several,
                    co-firing duplicates spend two of a token's k latents on one direction."""
    n, m = t.n_experts, t.m
    best, partner = cross_expert_partner(w.reshape(m, t.d), n, cfg.block)
    g = torch.Generator().manual_seed(cfg.seed + 0x51ED)
    rand_best, _ = cross_expert_partner(torch.randn(m, t.d, generator=g).to(device), n, cfg.block)
    observed, random = best.mean().item(), rand_best.mean().item()
    dup = best > cfg.threshold
    pairs = torch.stack([dup.nonzero().squeeze(1), partner[dup]], dim=1)
    out: dict[str, Any] = {"overlap": observed, "overlap_random": random, "excess": overlap_excess(observed, random),
                           "overlap_quantiles": dict(zip(("p50", "p90", "p99"), np.quantile(
                               best.double().cpu().numpy(), [0.5, 0.9, 0.99]).tolist(), strict=True)),
                           "near_duplicate_pairs": len(pairs), "cofire_tokens": 0, "cofire": None,
                           "duplicate_firing_share": None}
    run = RunDir(t.dir)
    if not cfg.cofire_tokens or not run.has_config:
        out["cofire_note"] = "not measured: " + ("cofire_tokens=0" if not cfg.cofire_tokens else
                                                 "the run records no store (no config.yaml)")
        return out
    with reraise_as(GeometryError):
        held = run.open(device).held
    sae.eval()
    x = torch.cat(list(held.rows(cfg.cofire_tokens)))[:, : t.d].numpy()  # a transcoder reads its input half
    rows, latents, _ = encode_rows(sae, x, COFIRE_BATCH, device)
    routed = latents < m  # a shared expert's latents are in no expert
    out.update(cofire_tokens=len(x), **cofiring(torch.from_numpy(rows[routed]).to(device),
                                                torch.from_numpy(latents[routed]).to(device), pairs, m))
    return out


def geometry(cfg: GeometryConfig) -> tuple[list[dict[str, Any]], list[Path]]:
    """Analyse every run of `cfg` (all inputs checked first; GeometryError on bad input).
    Returns (the geometry.json dicts, the geometry.json paths and the comparison plot written)."""
    targets, base, compare = plan(cfg)
    with reraise_as(GeometryError):
        device = pick_device(cfg.device)
    results, written, series, cache = [], [], {}, {}
    for t in targets:
        print(f"geometry: {t.dir} ({t.arch}, M={t.m}, d={t.d}, device {device})", flush=True)
        result, nns = analyse(t, cfg, base, device, cache)
        results.append(result)
        written.append(t.out / RunDir.GEOMETRY)
        series[t.dir.name if t.dir.name not in series else str(t.dir)] = nns
    if compare is not None:
        plot_hist(series, cfg.threshold, cfg.bins, compare / "geometry_compare.png")
        written.append(compare / "geometry_compare.png")
    return results, written


def table(results: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per run and feature matrix, plus the Switch baselines."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    head = ("run", "arch", "M", "vectors", "nn_cos_mean", "dup_frac", "cross_dup", "within", "between", "excess",
            "cofire")
    rows = []
    for r in results:
        name = Path(r["run"]).name
        for matrix in MATRICES:
            e = r[matrix]
            red = (r.get("redundancy") or {}) if matrix == "decoder" else {}
            rows.append((name, r["arch"], str(r["n_latents"]), matrix, f(e["nn_cos_mean"]), f(e["dup_frac"]),
                         f(e.get("cross_expert_dup_frac")), f(e.get("within_expert")), f(e.get("between_experts")),
                         f(red.get("excess")), f(red.get("cofire"))))
        if r.get("baseline"):
            b = r["baseline"]
            kind = "baseline (topk blocks)" if b["kind"].startswith("random blocks") else "baseline (random unit)"
            rows.append((name, "", "", kind, "-", "-", "-", f(b["within_expert"]), f(b["between_experts"]), "-", "-"))
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)) for row in [head, *rows])


@hydra.main(config_path="../conf/eval", config_name="geometry", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `geometry: error: ...` and exit 2 on bad input."""
    with one_line_errors("geometry"):
        results, written = geometry(GeometryConfig.from_omegaconf(cfg))
    print(table(results))
    print("written: " + ", ".join(map(str, written)))


if __name__ == "__main__":
    launch("geometry", main, GeometryConfig.from_omegaconf, conf="eval")
