"""`python -m eval.report sweep=<dir> [out=<dir>] [title=...]`: plots and a Markdown report of a sweep.

Every `eval.json` under the sweep folder (searched recursively) is one evaluated run; its folder
relative to the sweep is the run's label. `build_report` writes, into `out`:

- `pareto.png`: the paper's Figure 3, a 2x2 grid: MSE and 1 - loss recovered against L0, for
  width-matched runs (left) and FLOP-matched runs (right); TopK, ReLU and Gated runs appear in both.
- `scaling.png`: the paper's Figure 1: MSE against training FLOPs and against parameters, TopK and
  Switch (one series per N, and per k when k varies; FLOP-matched Switch points drawn hollow).
- `curves.png`: every run's validation curve (validation.jsonl): held-out MSE against training FLOPs
  and against training seconds, so that runs compare at equal compute within their lives.
- `report.md`: title, a summary line, the distinct evaluation notes, what the runs say about the
  paper's claims (eval/compute.py), the images, the MSE of every run at common FLOP budgets read off
  its validation curve, one table row per run.
- `runs.csv`: the same table with unrounded numbers.

Every eval.json is read and checked before anything is written; bad input raises `ReportError`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from eval import compute
from eval.plots import figure, save_png
from runtime.cli import launch
from eval.result import EvalResult
from runtime.config import NULL, Rule, text, typed_config
from runtime.errors import ToolkitError, one_line_errors, reraise_as
from train.run_dir import RunDir
from train.saes import REGISTRY, SAE

MISSING = "—"


class ReportError(ToolkitError):
    """Bad input for the report: no sweep folder, no eval.json in it, or a malformed eval.json."""


@dataclass(frozen=True)
class EvaluatedRun:
    """One evaluated run: its label (folder relative to the sweep), its eval.json and its validation
    curve (validation.jsonl records; empty when trained without validation)."""

    label: str
    data: EvalResult
    curve: tuple[dict[str, Any], ...] = ()

    def get(self, key: str) -> Any:
        """The eval.json field `key` (EvalResult.get)."""
        return self.data.get(key)

    @property
    def sae(self) -> type[SAE]:
        """The run's architecture class (its display name and kind)."""
        return REGISTRY[self.data["arch"]]

    @property
    def series(self) -> str:
        """Legend name: the architecture, and with experts also N ("Switch N=8")."""
        name = self.sae.display_name
        return f"{name} N={self.data.get('n_experts')}" if self.sae.has_experts else name

    @property
    def sort_key(self) -> tuple:
        d = self.data
        return (d["arch"], d.get("match") or "", d.get("n_experts") or 0, d["n_latents"], d.get("k") or 0, self.label)


# --------------------------------------------------------------------------------------- input

def load_runs(sweep: Path) -> list[EvaluatedRun]:
    """Every eval.json under `sweep`, checked, sorted by (arch, match, N, n_latents, k)."""
    if not sweep.is_dir():
        raise ReportError(f"sweep folder {sweep} does not exist")
    runs = []
    for path in sorted(sweep.rglob(RunDir.EVAL)):
        run = RunDir(path.parent)
        with reraise_as(ReportError):
            result = EvalResult.read(run)
        runs.append(EvaluatedRun(path.parent.relative_to(sweep).as_posix(), result, tuple(run.read_validation())))
    if not runs:
        raise ReportError(f"no eval.json found under {sweep}")
    return sorted(runs, key=lambda r: r.sort_key)


# --------------------------------------------------------------------------------------- plots

def _styles(runs: list[EvaluatedRun]) -> dict[str, dict[str, Any]]:
    """One colour and marker per series, the same in every panel and figure: the architectures in
    registry order, those with experts last (by N)."""
    order = {arch: i for i, arch in enumerate(REGISTRY)}
    keys = {r.series: (r.sae.has_experts, order[r.data["arch"]], r.get("n_experts") or 0) for r in runs}
    names = sorted(keys, key=keys.__getitem__)
    markers = "osD^v<>pP*Xh"
    return {s: {"color": f"C{i % 10}", "marker": markers[i % len(markers)]} for i, s in enumerate(names)}


def _panel(ax: Any, runs: list[EvaluatedRun], x: Callable[[EvaluatedRun], Any], y: Callable[[EvaluatedRun], Any],
           styles: dict[str, dict[str, Any]], skipped_what: str = "", line: tuple[str, str] | None = None) -> None:
    """Draw one panel: a line per series through its points sorted by x (with `line` = (eval.json key,
    legend name), one per series and value of that key when it varies, dashed after the first),
    hollow markers for FLOP-matched Switch points, log x; runs whose x or y is missing are skipped
    and counted in a corner note."""
    points = [(x(r), y(r), r) for r in runs]
    good = [p for p in points if p[0] is not None and p[1] is not None and math.isfinite(p[0]) and math.isfinite(p[1])]
    skipped = len(points) - len(good)
    if not good:
        ax.text(0.5, 0.5, "no runs" if not runs else f"no runs with {skipped_what or 'values'}",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
    values = sorted({p[2].get(line[0]) for p in good}, key=lambda v: (v is None, v)) if line else [None]
    for series, style in styles.items():
        for i, value in enumerate(values):
            pts = sorted((p for p in good if p[2].series == series and (not line or p[2].get(line[0]) == value)),
                         key=lambda p: p[0])
            if not pts:
                continue
            name = f"{series} {line[1]}={value}" if line and len(values) > 1 else series
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style["color"], lw=1.2, alpha=0.8,
                    linestyle=("-", "--", ":", "-.")[i % 4])
            for hollow in (False, True):
                sel = [p for p in pts if (p[2].get("match") == "flops" and p[2].sae.has_experts) == hollow]
                if sel:
                    ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=style["marker"], s=36, zorder=3,
                               edgecolors=style["color"], facecolors="none" if hollow else style["color"],
                               label=None if hollow and len(sel) < len(pts) else name)
    if skipped and good:
        ax.text(0.98, 0.98, f"{skipped} run(s) without {skipped_what or 'values'} not shown", ha="right",
                va="top", transform=ax.transAxes, fontsize=8, color="0.4", zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    if good and all(p[0] > 0 for p in good):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if good:
        ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)


def _lost(r: EvaluatedRun) -> float | None:
    """1 - loss recovered, or None when CE was not measured."""
    lr = r.get("loss_recovered")
    return None if lr is None else 1 - lr


def plot_pareto(runs: list[EvaluatedRun], path: Path, styles: dict[str, dict[str, Any]]) -> None:
    """Figure 3: MSE and 1 - loss recovered vs L0; width-matched (left) and FLOP-matched (right)."""
    fig, axes = figure(2, 2, (11, 8.5))
    dense = [r for r in runs if not r.sae.has_experts]
    experts = [r for r in runs if r.sae.has_experts]
    columns = {"width-matched": dense + [r for r in experts if r.get("match") != "flops"],
               "FLOP-matched": dense + [r for r in experts if r.get("match") == "flops"]}
    for j, (name, col) in enumerate(columns.items()):
        _panel(axes[0, j], col, lambda r: r.get("l0"), lambda r: r.get("mse"), styles, line=("n_latents", "M"))
        _panel(axes[1, j], col, lambda r: r.get("l0"), _lost, styles, skipped_what="CE", line=("n_latents", "M"))
        axes[0, j].set_title(name)
        axes[0, j].set_ylabel("MSE")
        axes[1, j].set_ylabel("1 − loss recovered")
        axes[1, j].set_xlabel("L0 (active latents per token)")
    save_png(fig, path)


def plot_scaling(runs: list[EvaluatedRun], path: Path, styles: dict[str, dict[str, Any]]) -> None:
    """Figure 1: MSE vs training FLOPs and vs parameters, TopK and Switch (hollow: FLOP-matched)."""
    fig, axes = figure(1, 2, (11, 4.5))
    sel = [r for r in runs if r.sae.sparse_codes]  # the TopK-style SAEs: topk and switch
    for ax, key, label in ((axes[0, 0], "train_flops", "training FLOPs"), (axes[0, 1], "params", "parameters")):
        _panel(ax, sel, lambda r, key=key: r.get(key), lambda r: r.get("mse"), styles, skipped_what=label,
               line=("k", "k"))
        ax.set_xlabel(label)
        ax.set_ylabel("held-out MSE")
    save_png(fig, path)


def plot_curves(runs: list[EvaluatedRun], path: Path, styles: dict[str, dict[str, Any]]) -> bool:
    """Every run's validation curve: held-out MSE against cumulative training FLOPs (log) and against
    training seconds, coloured by series. False (and nothing written) when no run has a curve."""
    with_curves = [r for r in runs if len(r.curve) > 1]
    if not with_curves:
        return False
    fig, axes = figure(1, 2, (12, 4.8))
    named: set[str] = set()
    for r in with_curves:
        style = styles[r.series]
        label = r.series if r.series not in named else None
        named.add(r.series)
        pts = [v for v in r.curve if v.get("mse") is not None]
        for ax, key in ((axes[0, 0], "train_flops"), (axes[0, 1], "seconds")):
            xy = [(v[key], v["mse"]) for v in pts if key != "train_flops" or v[key] > 0]  # log axis: no 0
            ax.plot([p[0] for p in xy], [p[1] for p in xy], color=style["color"], lw=1.0, alpha=0.75,
                    marker=style["marker"], markersize=3, label=label if ax is axes[0, 0] else None)
            ax.annotate(r.label, xy[-1], fontsize=6, color=style["color"], xytext=(3, 0), textcoords="offset points")
    axes[0, 0].set_xscale("log")
    axes[0, 0].set_xlabel("training FLOPs so far")
    axes[0, 1].set_xlabel("training seconds so far (this machine; validation not counted)")
    for ax in axes[0]:
        ax.set_ylabel("held-out MSE (validation sample)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="best")
    save_png(fig, path)
    return True


# --------------------------------------------------------------------------------------- table

def _num(x: Any) -> str:
    return MISSING if x is None else f"{x:.4g}"


def _int(x: Any) -> str:
    return MISSING if x is None else str(x)


def _count(x: Any) -> str:
    return MISSING if x is None else f"{x:,}"


def _sci(x: Any) -> str:
    return MISSING if x is None else f"{x:.2e}"


def _n_experts(r: EvaluatedRun) -> Any:
    return r.get("n_experts") if r.sae.has_experts else None


# (header, eval.json key or a function of the run, formatter)
COLUMNS: list[tuple[str, str | Callable[[EvaluatedRun], Any], Callable[[Any], str]]] = [
    ("label", lambda r: r.label, str), ("arch", "arch", str), ("match", "match", lambda x: MISSING if x is None else x),
    ("N", _n_experts, _int), ("M", "n_latents", _int), ("k", "k", _int), ("L0", "l0", _num), ("MSE", "mse", _num),
    ("NMSE", "nmse", _num), ("FVE", "fve", _num), ("loss recovered", "loss_recovered", _num),
    ("delta CE", "delta_ce", _num), ("KL", "kl", _num), ("dead frac", "dead_frac", _num),
    ("params", "params", _count), ("train FLOPs", "train_flops", _sci),
]


def _cells(r: EvaluatedRun) -> list[tuple[Any, Callable[[Any], str]]]:
    """(value, formatter) of every column for one run."""
    return [(get(r) if callable(get) else r.get(get), fmt) for _, get, fmt in COLUMNS]


def markdown_table(runs: list[EvaluatedRun]) -> str:
    """One row per run; `|` in labels is escaped."""
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in runs:
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v, fmt in _cells(r)) + " |")
    return "\n".join(lines)


def write_csv(runs: list[EvaluatedRun], path: Path) -> None:
    """The table's columns with unrounded values; missing values are empty cells."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c[0] for c in COLUMNS])
        for r in runs:
            w.writerow(["" if v is None else v for v, _ in _cells(r)])


def _summary(runs: list[EvaluatedRun], sweep: Path) -> list[str]:
    """The line with the run count, evaluation budget and stores, then the distinct notes."""
    tokens = sorted({r.get("eval_tokens") for r in runs if r.get("eval_tokens") is not None})
    ce = sorted({r.get("ce_tokens") for r in runs if r.get("ce_tokens") is not None})
    stores = sorted({str(r.get("store")) for r in runs if r.get("store")})
    line = f"**{len(runs)} run{'s' if len(runs) != 1 else ''}** from `{sweep}`"
    if tokens:
        line += f", evaluated on {' / '.join(f'{t:,}' for t in tokens)} tokens"
    line += f"; CE on {' / '.join(f'{t:,}' for t in ce)} tokens" if ce else "; CE not measured"
    if stores:
        line += f"; store{'s' if len(stores) > 1 else ''}: " + ", ".join(f"`{s}`" for s in stores)
    notes = list(dict.fromkeys(n for r in runs for n in (r.get("notes") or [])))
    return [line + ".", ""] + (["Notes:", ""] + [f"- {n}" for n in notes] + [""] if notes else [])


def equal_compute_section(runs: list[EvaluatedRun]) -> list[str]:
    """The 'at equal training compute' table (Markdown lines), or a line saying why there is none."""
    with_curves = [r for r in runs if len(r.curve) > 1]
    budgets = compute.common_budgets([r.curve for r in with_curves])
    if not budgets:
        return ["No run has a validation curve (train with eval_every > 0, the default), so none can be read "
                "at equal compute.", ""]
    return ["Held-out MSE of each run read off its validation curve at common training-FLOP budgets "
            "(linear between validations; `not reached`: the run stopped before; bold: the lowest). "
            f"Each point averages the validation sample of {_tokens(with_curves)} held-out tokens.", "",
            compute.markdown([(r.label, r.curve) for r in with_curves], budgets), ""]


def _tokens(runs: list[EvaluatedRun]) -> str:
    counts = sorted({v.get("eval_tokens") for r in runs for v in r.curve if v.get("eval_tokens") is not None})
    return " / ".join(f"{c:,}" for c in counts) or "?"


def build_report(sweep: Path, out: Path, title: str | None = None, intro: list[str] | None = None) -> Path:
    """Read every eval.json (and validation.jsonl) under `sweep` and write pareto.png, scaling.png,
    curves.png, report.md and runs.csv into `out` (created if needed). `intro`: paragraphs opening the
    report, before what the runs say about the paper's claims (`compute.findings`). Returns the path of
    report.md. Raises ReportError on bad input, before anything is written."""
    sweep, out = Path(sweep), Path(out)
    runs = load_runs(sweep)
    out.mkdir(parents=True, exist_ok=True)
    styles = _styles(runs)
    plot_pareto(runs, out / "pareto.png", styles)
    plot_scaling(runs, out / "scaling.png", styles)
    curves = plot_curves(runs, out / "curves.png", styles)
    write_csv(runs, out / "runs.csv")
    claims = compute.findings(runs)
    md = [f"# {title or f'SAE evaluation: {sweep.resolve().name}'}", "", *(intro or []), *_summary(runs, sweep)]
    if claims:
        md += ["## What these runs say about the paper's claims", "", *[f"- {c}" for c in claims], ""]
    md += ["## MSE vs training FLOPs and parameters (Figure 1)", "", "![Scaling](scaling.png)", "",
           "Final held-out MSE of every TopK-style run; one line per family (and per k when k varies); hollow "
           "markers: FLOP-matched Switch runs.", ""]
    if curves:
        md += ["![Validation curves](curves.png)", "",
               "Validation curves: held-out MSE during training against the training FLOPs and the seconds spent "
               "so far, one line per run (label at its end). Seconds are this machine's; the first run of a "
               "process also pays one-off warm-up.", ""]
    md += ["## At equal training compute", "", *equal_compute_section(runs),
           "## MSE and loss recovered vs L0 (Figure 3)", "", "![Pareto fronts](pareto.png)", "",
           "Left: width-matched Switch runs; right: FLOP-matched ones; TopK, ReLU and Gated in both; one line per "
           "family (and per width M when it varies).", "", "## Runs", "", markdown_table(runs), "",
           "Unrounded values: [runs.csv](runs.csv).", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


@dataclass(frozen=True)
class ReportConfig:
    """conf/eval/report.yaml (every key documented there)."""

    sweep: str
    out: str | None
    title: str | None

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> ReportConfig:
        """The typed config of a composed conf/eval/report.yaml, every value checked; ReportError in one line."""
        return typed_config(cls, cfg, ReportError, "report", "conf/eval/report.yaml", RULES,
                            required={"sweep": "sweep=<dir> is required: the folder holding the evaluated runs"})


# every key of conf/eval/report.yaml (documented there) and what its value must be
RULES: dict[str, Rule] = {"sweep": text("a path"), "out": text("a path") | NULL, "title": text() | NULL}


@hydra.main(config_path="../conf/eval", config_name="report", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `report: error: ...` and exit 2 on bad input."""
    with one_line_errors("report"):
        typed = ReportConfig.from_omegaconf(cfg)
        sweep = Path(typed.sweep)
        path = build_report(sweep, Path(typed.out) if typed.out else sweep, typed.title)
    print(f"report: {path}")


if __name__ == "__main__":
    launch("report", main, ReportConfig.from_omegaconf, conf="eval")
