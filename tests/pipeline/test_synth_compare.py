"""pipeline/synth_compare.py (`make synth-compare`): the shipped config is valid for every stage, and a tiny
version runs end to end: store, runs per seed, eval against the truth, geometry's redundancy, the report."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from pipeline.synth_compare import SynthCompareError, plan, run_compare
from runtime.config import compose_app


def test_the_shipped_config_is_valid_for_every_stage():
    synth, runs = plan(compose_app("demo", [], "synth"))
    assert synth.features == 512 and len(runs) == 10 * 2
    assert {cfg.run_budget.kind for cfg in runs.values()} == {"flops"}  # one budget: equal training FLOPs
    assert {cfg.model["arch"] for cfg in runs.values()} == {"topk", "batchtopk", "matryoshka", "switch",
                                                            "matryoshka_switch"}


def test_a_tiny_comparison_end_to_end(tmp_path):
    cfg = compose_app("demo", [f"out={tmp_path / 'out'}"], "synth")
    cfg.synth = [f"store={tmp_path / 'store'}", "tokens=32768", "chunk_rows=2048", "d=16", "features=64", "l0=3",
                 "clusters=4", "parents=4", "children=2", "groups=2", "group_size=2", "progress=false"]
    cfg.train = ["budget=flops:2e8", "batch_size=512", "data.eval_frac=0.25", "eval_tokens=512", "progress=false",
                 "device=cpu"]
    cfg.seeds = [0, 1]
    cfg.runs = OmegaConf.create({"topk": ["model=topk", "model.width=64", "model.k=3"],
                                 "global": ["model=matryoshka_switch", "model.n_experts=4", "model.width=64",
                                            "model.k=4", "model.active_experts=2", "model.routing=global"]})
    cfg.eval = ["ce=false", "progress=false", "device=cpu"]
    cfg.geometry = ["tsne=false", "device=cpu", "cofire_tokens=2048"]
    report = run_compare(cfg).read_text()
    assert "| topk |" in report and "| global |" in report and "![recovery and absorption" in report
    rows = json.loads((tmp_path / "out" / "synth.json").read_text())
    assert [(r["run"], r["seed"]) for r in rows] == [("topk", 0), ("topk", 1), ("global", 0), ("global", 1)]
    flops = [r["train_flops"] for r in rows]
    assert max(flops) / min(flops) < 1.05  # equal training FLOPs (within one step)
    topk, routed = rows[0], rows[2]
    assert topk["excess"] is None and routed["excess"] is not None and routed["cofire"] is not None
    assert all(0 <= r["recovered"] <= 1 for r in rows) and routed["train_tokens"] > topk["train_tokens"]
    assert (tmp_path / "out" / "synth.png").stat().st_size > 5_000


def test_bad_config_is_one_line():
    cfg = compose_app("demo", [], "synth")
    cfg.runs = OmegaConf.create({"bad": ["model=matryoshka", "model.prefixes=[0.5,0.25]"]})
    with pytest.raises(Exception, match=r"model.prefixes=\[0.5, 0.25\] must be strictly increasing") as e:
        plan(cfg)
    assert "\n" not in str(e.value)
    cfg.runs, cfg.seeds = OmegaConf.create({}), []
    with pytest.raises(SynthCompareError, match="runs and seeds must both be non-empty"):
        plan(cfg)
