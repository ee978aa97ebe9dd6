"""eval/report.py: the sweep report (plots, report.md, runs.csv) in-process and as `python -m eval.report`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.report import ReportError, build_report

ROOT = Path(__file__).resolve().parents[2]
NOTE_POS0 = "position 0 excluded (harvest keep_pos0=false)"
NOTE_OUTLIERS = "rows with norm > 10x the median kept in MSE, counted in outlier_frac"


def _run(arch: str, n_latents: int, k: int | None, l0: float, mse: float, *, match: str | None = None,
         n: int | None = None, ce: bool = True, flops: float = 1.234e12, notes: tuple[str, ...] = (NOTE_POS0,)) -> dict:
    """A synthetic eval.json following the schema (CE keys null when ce=False)."""
    lr = 0.9 - mse if ce else None
    return {
        "run": f"runs/{arch}", "arch": arch, "match": match, "n_latents": n_latents, "k": k, "n_experts": n,
        "d": 576, "train_steps": 2000, "train_tokens": 8_192_000,
        "mse": mse, "nmse": mse * 2, "fve": 1 - mse * 2, "l0": l0, "dead_frac": 0.01,
        "expert_load": [1 / n] * n if n else None, "expert_entropy": 2.0 if n else None,
        "params": 2 * n_latents * 576 + n_latents + 576, "flops_forward_per_token": 1e6, "flops_train_per_token": 3e6,
        "train_flops": flops,
        "ce_clean": 3.0 if ce else None, "ce_sae": 3.2 if ce else None, "ce_zero": 9.0 if ce else None,
        "loss_recovered": lr, "delta_ce": 0.2 if ce else None, "kl": 0.15 if ce else None,
        "eval_tokens": 100_000, "ce_tokens": 20_000 if ce else None, "outlier_frac": 0.001, "notes": list(notes),
    }


# label (folder relative to the sweep) -> eval.json; labels contain "=" and "," like Hydra sweep folders
RUNS = {
    "topk/model.width=4096": _run("topk", 4096, 32, 32.0, 0.0123456),
    "switch/model.n_experts=4,model.match=width": _run("switch", 4096, 32, 31.5, 0.0201, match="width", n=4,
                                                       flops=3.3e11, notes=(NOTE_POS0, NOTE_OUTLIERS)),
    "switch/model.n_experts=8,model.match=width": _run("switch", 4096, 32, 30.0, 0.0252, match="width", n=8,
                                                       flops=1.7e11),
    "switch/model.n_experts=4,model.match=flops": _run("switch", 16384, 32, 32.0, 0.0105, match="flops", n=4),
    "relu": _run("relu", 4096, None, 85.25, 0.0333, ce=False),
}
ORDER = ["relu", "switch/model.n_experts=4,model.match=flops", "switch/model.n_experts=4,model.match=width",
         "switch/model.n_experts=8,model.match=width", "topk/model.width=4096"]  # by (arch, match, N, M, k)


def _sweep(root: Path, runs: dict[str, dict] = RUNS) -> Path:
    for label, data in runs.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / "eval.json").write_text(json.dumps(data))
    return root


def _table(md: str) -> list[list[str]]:
    """The Markdown table's body rows as cells (header and separator dropped)."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| label | arch | match | N | M | k | L0 | MSE |"), rows[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows[1:]]


def _valid_png(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes"
    return matplotlib.image.imread(path).shape


def test_report_has_one_row_per_run_and_both_figures(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    path = build_report(sweep, out, title="Demo sweep")
    assert path == out / "report.md"
    md = path.read_text()
    assert md.startswith("# Demo sweep\n")
    assert "**5 runs**" in md and "CE on 20,000 tokens" in md and "100,000 tokens" in md
    assert md.count(NOTE_POS0) == 1 and md.count(NOTE_OUTLIERS) == 1  # distinct notes, listed once
    assert "![Pareto fronts](pareto.png)" in md and "![Scaling](scaling.png)" in md

    rows = _table(md)
    assert [r[0] for r in rows] == ORDER
    by = {r[0]: dict(zip(["label", "arch", "match", "N", "M", "k", "L0", "MSE", "NMSE", "FVE", "lr", "dce", "kl",
                          "dead", "params", "flops"], r, strict=True)) for r in rows}
    topk = by["topk/model.width=4096"]
    assert (topk["arch"], topk["match"], topk["N"], topk["M"], topk["k"]) == ("topk", "—", "—", "4096", "32")
    assert topk["MSE"] == "0.01235" and topk["L0"] == "32" and topk["flops"] == "1.23e+12"
    assert topk["lr"] == "0.8877" and topk["params"] == f"{2 * 4096 * 576 + 4096 + 576:,}"
    sw = by["switch/model.n_experts=8,model.match=width"]
    assert (sw["arch"], sw["match"], sw["N"], sw["flops"]) == ("switch", "width", "8", "1.70e+11")
    assert by["switch/model.n_experts=4,model.match=flops"]["M"] == "16384"
    relu = by["relu"]
    assert relu["k"] == "—" and relu["L0"] == "85.25"
    assert relu["lr"] == relu["dce"] == relu["kl"] == "—"

    with (out / "runs.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == ORDER
    csv_topk = table[ORDER.index("topk/model.width=4096")]
    assert float(csv_topk["MSE"]) == 0.0123456 and float(csv_topk["train FLOPs"]) == 1.234e12
    assert table[0]["loss recovered"] == "" and table[0]["k"] == ""

    assert _valid_png(out / "pareto.png")[2] in (3, 4)
    assert _valid_png(out / "scaling.png")[2] in (3, 4)
    assert not (sweep / "report.md").exists()  # out= given: nothing written into the sweep


def test_panels_without_runs_do_not_crash(tmp_path):
    """Only a ReLU run without CE: the CE row and both scaling panels have no points."""
    sweep = _sweep(tmp_path / "sweep", {"only/relu": RUNS["relu"]})
    path = build_report(sweep, sweep)
    assert path == sweep / "report.md"
    assert [r[0] for r in _table(path.read_text())] == ["only/relu"]
    assert "CE not measured" in path.read_text()
    _valid_png(sweep / "pareto.png")
    _valid_png(sweep / "scaling.png")


def test_malformed_eval_json_raises_naming_the_file(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    bad = sweep / "switch" / "model.n_experts=8,model.match=width" / "eval.json"
    bad.write_text(json.dumps({**RUNS["topk/model.width=4096"], "mse": "low"}))
    with pytest.raises(ReportError, match=r"model\.n_experts=8,model\.match=width/eval\.json: mse must be a number"):
        build_report(sweep, sweep)
    assert not list(sweep.glob("*.png")) and not (sweep / "report.md").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_the_report_into_the_sweep_by_default(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    hydra_dir_before = (ROOT / ".hydra").exists()
    proc = _cli(f"sweep={sweep}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report: {sweep / 'report.md'}"
    md = (sweep / "report.md").read_text()
    assert md.startswith(f"# SAE evaluation: {sweep.name}\n")
    assert [r[0] for r in _table(md)] == ORDER
    for name in ("pareto.png", "scaling.png", "runs.csv"):
        assert (sweep / name).is_file(), name
    assert (ROOT / ".hydra").exists() == hydra_dir_before and not (ROOT / "report.log").exists()


def _malformed(root: Path) -> Path:
    sweep = _sweep(root / "sweep")
    (sweep / "relu" / "eval.json").write_text('{"arch": "relu", "mse": 0.1,')  # truncated
    return sweep


def _empty(root: Path) -> Path:
    (root / "sweep" / "run").mkdir(parents=True)
    (root / "sweep" / "run" / "metrics.jsonl").write_text("{}\n")
    return root / "sweep"


@pytest.mark.parametrize("make, expect", [
    (lambda root: root / "nowhere", "sweep folder"),
    (_empty, "no eval.json found under"),
    (_malformed, "relu/eval.json: not valid JSON"),
    (lambda root: _sweep(root / "sweep", {"a": {**RUNS["relu"], "arch": "sparse"}}), "a/eval.json: arch must be"),
], ids=["missing-dir", "no-eval-json", "bad-json", "unknown-arch"])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, make, expect):
    sweep = make(tmp_path)
    out = tmp_path / "out"
    proc = _cli(f"sweep={sweep}", f"out={out}")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("report: error:") and expect in lines[0], proc.stderr
    assert not out.exists() and not (sweep / "report.md").exists()


def test_cli_without_sweep_is_an_error():
    proc = _cli()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "report: error: sweep=<dir> is required: the folder holding the evaluated runs"]


# ------------------------------------------------------------------ equal compute (eval/compute.py)

def _curve(points: list[tuple[float, float]], seconds_per_flop: float = 1e-10) -> list[dict]:
    """Hand-made validation records: (training FLOPs, MSE) at steps 0, 10, 20, ..."""
    return [{"step": 10 * i, "tokens": 1000 * i, "train_flops": f, "seconds": f * seconds_per_flop, "mse": m,
             "eval_tokens": 512} for i, (f, m) in enumerate(points)]


def test_curves_are_read_at_equal_compute_by_linear_interpolation():
    from eval.compute import common_budgets, flops_to_reach, markdown, mse_at

    dense = _curve([(0.0, 10.0), (1e11, 6.0), (2e11, 4.0)])
    sparse = _curve([(0.0, 10.0), (5e10, 5.0), (1e11, 3.0)])
    assert mse_at(dense, 1.5e11) == pytest.approx(5.0) and mse_at(dense, 2e11) == 4.0
    assert mse_at(sparse, 7.5e10) == pytest.approx(4.0) and mse_at(sparse, 1.5e11) is None  # not reached
    assert flops_to_reach(dense, 4.0) == 2e11 and flops_to_reach(sparse, 4.0) == pytest.approx(7.5e10)
    assert flops_to_reach(sparse, 2.0) is None and flops_to_reach(dense, 10.0) == 0.0
    budgets = common_budgets([dense, sparse])
    assert budgets[0] == 1e11 and budgets[-1] == 2e11 and budgets == sorted(set(budgets))
    table = markdown([("dense", dense), ("sparse", sparse)], [1e11, 2e11])
    assert "| dense | 6 | **4** |" in table and "| sparse | **3** | not reached |" in table


def test_a_sweep_with_validation_curves_gets_curves_a_table_and_findings(tmp_path):
    runs = {"topk": _run("topk", 4096, 32, 32.0, 4.0, flops=2e11),
            "switch": _run("switch", 4096, 32, 31.0, 3.0, match="width", n=4, flops=1e11)}
    sweep = _sweep(tmp_path / "sweep", runs)
    for label, points in (("topk", [(0.0, 10.0), (1e11, 6.0), (2e11, 4.0)]),
                          ("switch", [(0.0, 10.0), (5e10, 5.0), (1e11, 3.0)])):
        (sweep / label / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _curve(points)))
    md = build_report(sweep, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    assert "![Validation curves](curves.png)" in md and "## At equal training compute" in md
    assert "| run | MSE at 1e+11 FLOPs | MSE at 1.2e+11 FLOPs | MSE at 1.5e+11 FLOPs | MSE at 2e+11 FLOPs |" in md
    assert "| switch | **3** | not reached | not reached | not reached |" in md
    assert "| topk | 6 | **5.6** | **5** | **4** |" in md
    assert ("Figure 1 (compute, k=32): Switch N=4 (switch) reached the held-out MSE of the best TopK run (topk, 4 at its end) after 7.5e+10 "
            "training FLOPs, less than that run's 2e+11 (2.7x)") in md
    assert "Fixed width: in 0 of 1 width-matched pairs (same width and k)" in md


def test_a_sweep_without_curves_says_so():
    from eval.report import EvaluatedRun, equal_compute_section
    from eval.result import EvalResult

    line = equal_compute_section([EvaluatedRun("a", EvalResult(**_run("topk", 64, 4, 4.0, 1.0)))])[0]
    assert line.startswith("No run has a validation curve")
