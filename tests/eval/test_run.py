"""`python -m eval`: tiny store -> two trained runs -> eval.json + table -> report; bad input in one line."""

import json
import subprocess
import sys

import pytest
from hydra import compose as compose_cfg, initialize_config_dir

from eval.report import build_report
from eval.run import EvalConfig, EvalError, evaluate
from harvest.run import harvest
from tests.conftest import CONF, ROOT, compose, eval_config, harvest_overrides
from tests.train.test_loop import make_cfg, synthetic_store
from train.loop import train
from train.saes.flops import cost

RUNS = {"topk": ["model=topk", "model.width=64", "model.k=4"],
        "switch": ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"]}


@pytest.fixture(scope="module")
def sweep(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    """A 20-chunk store of the tiny GPT-2 (d=32) and a topk and a switch run trained on it."""
    root = tmp_path_factory.mktemp("eval")
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, root / "store", tokens=600)))
    for name, model in RUNS.items():
        train(make_cfg(root / "store", *model, "budget=steps:40", "batch_size=32"), root / "sweep" / name)
    return root


def config(run, **kw) -> EvalConfig:
    return eval_config(run, **{"max_tokens": 10_000, "batch_size": 64, "ce_seqs": 6, "ce_batch": 4, **kw})


def test_eval_of_a_sweep_writes_every_run_and_the_report(sweep):
    results = {r["arch"]: r for r in evaluate(config(sweep / "sweep"))}
    assert set(results) == {"topk", "switch"}
    for arch, r in results.items():
        saved = json.loads((sweep / "sweep" / arch / "eval.json").read_text())
        assert saved["mse"] == r["mse"] and 0 < r["l0"] <= 4 and r["fve"] <= 1
        # held-out chunks 9 and 19: 30 rows and 2 sequences each (so 4 of the 6 CE sequences asked for)
        assert r["eval_tokens"] == 2 * 30
        assert r["ce_tokens"] == 4 * 14 and r["ce_clean"] != r["ce_zero"]
        assert r["loss_recovered"] == pytest.approx((r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"]))
        assert r["train_tokens"] == 40 * 32 and r["train_flops"] == r["flops_train_per_token"] * 40 * 32
        assert any("position 0 excluded" in n for n in r["notes"])
    assert results["topk"]["flops_forward_per_token"] == cost("topk", 32, width=64, k=4).forward
    assert results["switch"]["flops_forward_per_token"] == cost("switch", 32, n_experts=4, expert_width=16, k=4).forward
    assert len(results["switch"]["expert_load"]) == 4 and results["topk"]["expert_load"] is None
    # a second call finds both up to date and evaluates nothing
    assert evaluate(config(sweep / "sweep")) == []
    report = build_report(sweep / "sweep", sweep / "report")
    assert "| topk |" in report.read_text() and "| switch |" in report.read_text()
    for png in ("pareto.png", "scaling.png"):
        assert (sweep / "report" / png).stat().st_size > 10_000


def test_cli_prints_the_table(sweep):
    out = subprocess.run([sys.executable, "-m", "eval", f"run={sweep / 'sweep' / 'topk'}", "ce=false", "redo=true",
                          "progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    assert lines["arch"] == ["topk"] and lines["ce_sae"] == ["-"] and float(lines["l0"][0]) <= 4


def test_bad_input_is_one_line_and_writes_nothing(sweep, tmp_path):
    other = synthetic_store(tmp_path / "other", n_chunks=4, d=32)  # same d, other activations
    narrow = synthetic_store(tmp_path / "narrow", n_chunks=4, d=16)
    run = sweep / "sweep" / "topk"
    before = (run / "eval.json").read_text() if (run / "eval.json").exists() else None
    out = subprocess.run([sys.executable, "-m", "eval", f"run={run}", f"store={narrow}", "redo=true"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("eval: error: run ") and "d=32 activations but store" in out.stderr
    cases = [(tmp_path / "nope", {}, "does not exist"),
             (tmp_path, {}, "no trained SAE"),
             (run, dict(store=str(other)), "trained on other activations"),
             (run, dict(store=str(tmp_path)), "is not an activation store")]
    for where, kw, message in cases:
        with pytest.raises(EvalError, match=message):
            evaluate(config(where, redo=True, **kw))
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        for bad, message in [("outlier_factor=0.5", "outlier_factor"), ("dtype=float8", "dtype"), ("ce_seqs=0", "ce_seqs")]:
            with pytest.raises(EvalError, match=message):
                EvalConfig.from_omegaconf(compose_cfg("eval", overrides=[f"run={run}", bad]))
        with pytest.raises(EvalError, match="run= is required"):
            EvalConfig.from_omegaconf(compose_cfg("eval"))
    after = (run / "eval.json").read_text() if (run / "eval.json").exists() else None
    assert after == before
