"""`python -m pipeline.synth_compare [overrides]` (= `make synth-compare`): the architectures against a
known truth at equal training FLOPs.

conf/demo/synth.yaml: a synthetic store (harvest/synth.py; reused when complete), every run of `runs`
once per seed of `seeds`, each for the same `budget=flops:...`, evaluated on the held-out chunks (eval:
MSE, FVE, L0, dead latents, and against the truth: true features recovered, duplicate latents,
absorption on the hierarchies) and by geometry (near-duplicates, and for routed runs the redundancy
block: overlap between experts against random directions, co-firing of near-duplicates). Writes
`<out>/synth.md` (mean and range over the seeds per run), `synth.json` (every run and seed) and
`synth.png`. Every config is composed and checked before any work; re-running resumes (finished runs
are skipped, up-to-date eval.json files kept).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from eval.result import EvalResult
from harvest.synth import SynthConfig
from runtime.config import compose_app
from runtime.errors import ToolkitError, one_line_errors
from train.config import TrainConfig
from train.run_dir import RunDir

# what the table shows per run: (key in a row, column title, format); rows come from `measured`
COLUMNS = [("train_tokens", "tokens", ",.0f"), ("l0", "L0", ".1f"), ("mse", "MSE", ".4f"), ("fve", "FVE", ".3f"),
           ("recovered", "recovered", ".3f"), ("best_cos_mean", "best cos", ".3f"),
           ("duplicates", "dup. latents", ".1f"), ("absorption", "absorption", ".3f"),
           ("parent_recall", "parent recall", ".3f"), ("dead_frac", "dead", ".3f"),
           ("cross_expert_dup_frac", "cross-expert dup", ".3f"), ("excess", "overlap excess", ".3f"),
           ("cofire", "dup. co-firing", ".3f")]


class SynthCompareError(ToolkitError):
    """Bad comparison config; printed as one line."""


def plan(cfg: DictConfig) -> tuple[SynthConfig, dict[tuple[str, int], TrainConfig]]:
    """Compose and check every stage's config: (the store's, {(run, seed): train config})."""
    synth = SynthConfig.from_omegaconf(compose_app("synth", list(cfg.synth)))
    if not cfg.runs or not cfg.seeds:
        raise SynthCompareError("runs and seeds must both be non-empty")
    runs = {}
    for name, overrides in cfg.runs.items():
        for seed in cfg.seeds:
            train_cfg = TrainConfig.from_omegaconf(compose_app(
                "train", [*cfg.train, *overrides, f"seed={seed}", f"data.store={synth.store}"]))
            train_cfg.sae_kwargs(d=synth.d)  # the model keys against each other before anything runs
            runs[name, seed] = train_cfg
    compose_app("eval", [*cfg.eval, f"run={cfg.out}"])
    return synth, runs


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-seed{seed}"


def measured(name: str, seed: int, run: Path) -> dict[str, Any]:
    """One run's numbers, from its eval.json and geometry.json."""
    e = EvalResult.read(RunDir(run))
    g = json.loads((run / RunDir.GEOMETRY).read_text())
    red = g.get("redundancy") or {}
    return {"run": name, "seed": seed, "arch": e["arch"], "n_latents": e["n_latents"], "n_experts": e["n_experts"],
            "train_tokens": e["train_tokens"], "train_flops": e["train_flops"], "l0": e["l0"], "mse": e["mse"],
            "fve": e["fve"], "dead_frac": e["dead_frac"], "recovered": e["truth_recovered"],
            "best_cos_mean": e["truth_best_cos_mean"], "duplicates": e["truth_duplicates"],
            "absorption": e["truth_absorption"], "parent_recall": e["truth_parent_recall"],
            "dup_frac": g["dup_frac"], "cross_expert_dup_frac": g.get("cross_expert_dup_frac"),
            "excess": red.get("excess"), "cofire": red.get("cofire")}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, float] | None]]:
    """{run: {column key: (mean, min, max) over its seeds, or None where not measured}}."""
    out: dict[str, dict[str, tuple[float, float, float] | None]] = {}
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        out[name] = {}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in mine if r[key] is not None]
            out[name][key] = (float(np.mean(values)), min(values), max(values)) if values else None
    return out


def markdown(summary: dict[str, dict[str, tuple[float, float, float] | None]], n_seeds: int) -> list[str]:
    lines = ["| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, cols in summary.items():
        cells = []
        for key, _, fmt in COLUMNS:
            v = cols[key]
            if v is None:
                cells.append("-")
            elif n_seeds > 1 and v[2] > v[1]:
                cells.append(f"{format(v[0], fmt)} [{format(v[1], fmt)}, {format(v[2], fmt)}]")
            else:
                cells.append(format(v[0], fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict[str, dict[str, tuple[float, float, float] | None]], path: Path) -> None:
    """True features recovered and absorption against held-out MSE, mean and range over seeds per run."""
    from eval.plots import figure, save_png

    fig, axes = figure(1, 2, (13, 5))
    for ax, key, label in ((axes[0, 0], "recovered", "true features recovered (cos > 0.9; higher is better)"),
                           (axes[0, 1], "absorption", "absorption on the hierarchies (lower is better)")):
        for name, cols in summary.items():
            x, y = cols["mse"], cols[key]
            if x is None or y is None:
                continue
            ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        fmt="s" if "switch" in name else "o", capsize=2)
            ax.annotate(name, (x[0], y[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("held-out MSE (lower is better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Every run at the same training FLOPs on one synthetic store (mean and range over seeds)")
    save_png(fig, path)


def run_compare(cfg: DictConfig) -> Path:
    """Every stage; returns the report's path."""
    from eval.geometry import GeometryConfig, geometry
    from eval.run import EvalConfig, evaluate
    from harvest.synth import synthesize
    from train.loop import train

    synth, runs = plan(cfg)
    out = Path(cfg.out)
    started = time.perf_counter()
    synthesize(synth)
    for i, ((name, seed), train_cfg) in enumerate(runs.items()):
        print(f"[synth-compare] train {i + 1}/{len(runs)}: {name} seed {seed}", flush=True)
        train(train_cfg, run_dir(out, name, seed))
    evaluate(EvalConfig.from_omegaconf(compose_app("eval", [*cfg.eval, f"run={out / 'runs'}"])))
    dirs = [run_dir(out, name, seed) for name, seed in runs]
    geometry(GeometryConfig.from_omegaconf(compose_app(
        "eval", [*cfg.geometry, f"run=[{','.join(str(d) for d in dirs)}]"], "geometry")))
    rows = [measured(name, seed, run_dir(out, name, seed)) for name, seed in runs]
    summary = summarise(rows)
    (out / "synth.json").write_text(json.dumps(rows, indent=2))
    plot(summary, out / "synth.png")
    seeds = list(cfg.seeds)
    md = [f"# {cfg.title}", "",
          f"Settings: `conf/demo/{cfg.name}.yaml`; command `python -m pipeline.synth_compare` (`make synth-compare`). "
          f"Store: {synth.features} true features in d = {synth.d} ({synth.tokens:,} rows, every 10th chunk held "
          f"out). Every run trained for the same training FLOPs (as eval counts them), so cheaper architectures saw "
          f"more tokens; seeds {seeds}; each cell is the mean over the seeds with [min, max]. All numbers are on "
          "the held-out chunks. `recovered`: share of true features whose best-matching decoder direction has "
          "cosine > 0.9; `dup. latents`: latents matching a true feature another latent matches better; "
          "`absorption`: 1 - (a parent's best latent's recall where a child fires too) / (its recall where the "
          "parent fires alone), mean over the hierarchies' parents; `cross-expert dup`: share of features with a "
          "near-duplicate (cos > 0.9) in another expert; `overlap excess`: mean max cosine to another expert's "
          "features, placed between random directions (0) and all duplicated (1); `dup. co-firing`: how often a "
          "near-duplicate's partner fires on the same token. Total time of this command: "
          f"{time.perf_counter() - started:.0f} s.", "", *markdown(summary, len(seeds)), "",
          "![recovery and absorption against MSE](synth.png)", ""]
    path = out / "synth.md"
    path.write_text("\n".join(md))
    print(f"[synth-compare] {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.synth_compare [overrides]`: conf/demo/synth.yaml."""
    args = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors("synth-compare"):
        run_compare(compose_app("demo", args, "synth"))


if __name__ == "__main__":
    main()
