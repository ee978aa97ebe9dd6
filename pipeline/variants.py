"""`python -m pipeline.variants [overrides]` (= `make variants`): every SAE variant at one FLOP budget.

The demo pipeline (pipeline/demo.py) on conf/demo/variants.yaml: the demo store, one run per
architecture or Switch variant, each trained for the same `budget=flops:...`, evaluated on the held-out
chunks; then the geometry module on every run (near-duplicate features, and for Switch runs duplicates
across experts), and `<out>/variants.md`: one table row per run and a plot of held-out MSE and loss
recovered against L0, each point labelled with its run. Re-running resumes like the demo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from eval.absorption import FILE as ABSORPTION
from eval.result import EvalResult
from pipeline.demo import run_demo
from runtime.config import compose_app
from runtime.errors import one_line_errors
from train.run_dir import RunDir
from train.saes import REGISTRY


def row(name: str, run: Path) -> dict[str, Any]:
    """What the table shows of one run, from its eval.json, geometry.json and sae.json."""
    e = EvalResult.read(RunDir(run))
    g = json.loads((run / RunDir.GEOMETRY).read_text())
    a = json.loads((run / ABSORPTION).read_text())
    sae = RunDir(run).sae_config()
    options = {k: v for k, v in sae.items()
               if k in ("active_experts", "routing", "shared_width", "shared_k", "balance", "aux_k", "nesting")
               and v not in (0, 1, "aux_loss", "split")}
    return {"run": name, "arch": e["arch"], "options": ", ".join(f"{k}={v}" for k, v in options.items()),
            "n_latents": e["n_latents"], "params": e["params"], "train_tokens": e["train_tokens"],
            "train_flops": e["train_flops"], "l0": e["l0"], "mse": e["mse"], "fve": e["fve"],
            "loss_recovered": e.loss_recovered, "dead_frac": e["dead_frac"], "dup_frac": g["dup_frac"],
            "cross_expert_dup_frac": g.get("cross_expert_dup_frac"),
            "overlap_excess": (g.get("redundancy") or {}).get("excess"), "absorption": a["absorption"],
            "letter_fn": a["fn_rate"], "letter_f1": a["main_f1"]}


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| run | arch | options | M | params | tokens | train FLOPs | L0 | MSE | FVE | loss rec. | dead | "
             "dup | cross-expert dup | overlap excess | letter F1 | letter FN | absorption |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['arch']} | {r['options'] or '-'} | {r['n_latents']:,} | {r['params']:,} | "
                     f"{r['train_tokens']:,} | {r['train_flops']:.2e} | {r['l0']:.1f} | {r['mse']:,.0f} | "
                     f"{r['fve']:.3f} | {f(r['loss_recovered'], '.3f')} | {r['dead_frac']:.3f} | "
                     f"{r['dup_frac']:.3f} | {f(r['cross_expert_dup_frac'], '.3f')} | "
                     f"{f(r['overlap_excess'], '.3f')} | "
                     f"{f(r['letter_f1'], '.3f')} | {f(r['letter_fn'], '.3f')} | {f(r['absorption'], '.3f')} |")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Held-out MSE and loss recovered against L0, one labelled point per run."""
    from eval.plots import figure, save_png

    fig, axes = figure(1, 2, (12, 4.8))
    for ax, key, label in ((axes[0, 0], "mse", "held-out MSE (lower is better)"),
                           (axes[0, 1], "loss_recovered", "CE loss recovered (higher is better)")):
        for r in rows:
            if r[key] is None:
                continue
            marker = "s" if REGISTRY[r["arch"]].has_experts else "o"
            ax.scatter(r["l0"], r[key], marker=marker)
            ax.annotate(r["run"], (r["l0"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("L0 (held out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Every run at the same training FLOPs (squares: Switch and its variants)")
    save_png(fig, path)


def run_variants(cfg: DictConfig) -> Path:
    """The demo's stages on cfg, then geometry and variants.md; returns its path."""
    from eval.absorption import AbsorptionConfig, absorption
    from eval.geometry import GeometryConfig, geometry

    run_demo(cfg)
    out = Path(cfg.out)
    runs = [out / "runs" / name for name in cfg.runs]
    geometry(GeometryConfig.from_omegaconf(compose_app(
        "eval", [*cfg.geometry, f"run=[{','.join(str(r) for r in runs)}]"], "geometry")))
    for run in runs:
        absorption(AbsorptionConfig.from_omegaconf(compose_app("eval", [*cfg.absorption, f"run={run}"], "absorption")))
    rows = [row(name, run) for name, run in zip(cfg.runs, runs, strict=True)]
    plot(rows, out / "variants.png")
    (out / "variants.json").write_text(json.dumps(rows, indent=2))
    md = [f"# {cfg.title}", "", f"Settings: `conf/demo/{cfg.name}.yaml`. Every run trained for the same training "
          "FLOPs (as eval counts them), so cheaper architectures saw more tokens; all numbers are held out. "
          "`dup`: fraction of decoder features whose nearest other feature has cosine > 0.9; `cross-expert "
          "dup`: the same, counting only neighbours in other experts (Switch). `dead`: fraction of latents "
          "that never fired on the held-out tokens. `overlap excess`: routed runs' mean max cosine to another "
          "expert's features, placed between random directions (0) and all duplicated (1). First-letter "
          "absorption (eval/absorption.py, after SAEBench's definition from our recollection, not comparable to "
          "its numbers): `letter F1` how well each letter's best latents (up to 3) predict the first letter, "
          "`letter FN` the share of correctly probed word tokens where they stay silent, `absorption` the share "
          "where besides another latent carries the letter's probe direction; means over letters. One seed per "
          "run.", "", *markdown(rows), "",
          "![MSE and loss recovered vs L0](variants.png)", "", "Full report (Figures 1 and 3, curves): "
          "[report.md](report.md).", ""]
    path = out / "variants.md"
    path.write_text("\n".join(md))
    print(f"[variants] {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.variants [overrides]`: conf/demo/variants.yaml."""
    args = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors("variants"):
        run_variants(compose_app("demo", args, "variants"))


if __name__ == "__main__":
    main()
