"""pipeline.demo: its config composes into valid configs of every stage; the whole chain on a tiny model."""

import json

import pytest
from omegaconf import OmegaConf

from pipeline.demo import main, plan, run_demo
from pipeline.s3_demo import run_s3_demo
from runtime.config import compose_app


def test_the_shipped_demo_config_is_valid_for_every_stage():
    harvest_cfg, runs, eval_cfg = plan(compose_app("demo", []))
    assert harvest_cfg.model == "data/models/smollm2-135m" and harvest_cfg.tokens == 162_560
    assert {n for n in runs if n.startswith("topk")} == {"topk_512", "topk_1024", "topk_2048"}
    assert {n for n in runs if n.startswith("switch")} == {f"switch{n}_{w}" for n in (4, 8) for w in (512, 1024, 2048)}
    assert runs["switch8_512"].sae_kwargs(576)["expert_width"] == 64
    assert {r.model["k"] for r in runs.values()} == {32} and len({r.budget for r in runs.values()}) == 1
    assert all(r.data.store == harvest_cfg.store for r in runs.values())
    assert eval_cfg.run == "results/demo/runs"


def test_the_variants_config_is_valid_for_every_stage_and_covers_every_architecture():
    from eval.absorption import AbsorptionConfig
    from train.saes import REGISTRY

    cfg = compose_app("demo", [], "variants")
    _, runs, _ = plan(cfg)
    assert {r.model["arch"] for r in runs.values()} == set(REGISTRY)  # every architecture at one FLOP budget
    assert {r.budget for r in runs.values()} == {"flops:1e12"}
    assert runs["switch_top2_global"].model["routing"] == "global"
    AbsorptionConfig.from_omegaconf(compose_app("eval", [*cfg.absorption, "run=x"], "absorption"))


def test_the_cpu_replication_config_is_valid_for_every_stage():
    harvest_cfg, runs, _ = plan(compose_app("demo", [], "paper_cpu"))
    assert harvest_cfg.tokens == 1_950_000 and harvest_cfg.store.endswith("_2m") and len(runs) == 19
    assert {r.run_budget.kind for r in runs.values()} == {"tokens"} and len({r.budget for r in runs.values()}) == 1
    assert runs["fig3_switch4flops_k64"].sae_kwargs(576)["expert_width"] == 2048


def test_demo_end_to_end_on_a_tiny_model(tiny_gpt2, corpus_jsonl, tmp_path, capsys):
    cfg = compose_app("demo", [f"out={tmp_path / 'demo'}"])
    cfg.harvest = [f"model={tiny_gpt2}", "layer=2", f"dataset.name={corpus_jsonl}", f"store={tmp_path / 'store'}",
                   "context_size=16", "chunk_seqs=2", "tokens=600", "batch_size=4", "progress=false", "device=cpu"]
    cfg.train = ["budget=steps:20", "batch_size=32", "data.eval_frac=0.1", "progress=false", "device=cpu"]
    cfg.runs = OmegaConf.create({"topk": ["model=topk", "model.width=64", "model.k=4"],
                                 "switch": ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"]})
    cfg.eval = ["ce_seqs=4", "progress=false", "device=cpu"]
    report = run_demo(cfg)
    text = report.read_text()
    assert "| topk |" in text and "| switch |" in text and "Demo stage timings" in text
    assert text.splitlines()[2].startswith("2 SAEs trained on a store of the demo model (600 harvested tokens")
    assert "![Validation curves](curves.png)" in text and "| run | MSE at " in text
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert list(timings) == ["harvest", "train topk", "train switch", "eval", "report"]
    for name in ("topk", "switch"):
        assert json.loads((tmp_path / "demo" / "runs" / name / "eval.json").read_text())["ce_sae"] is not None
    # a second run reuses everything: the store, the runs and their evaluations
    capsys.readouterr()
    run_demo(cfg)
    printed = capsys.readouterr().out
    assert "reusing the complete store" in printed and printed.count("has finished; skipping") == 2
    assert printed.count("eval.json is up to date") == 2


def test_the_s3_demo_runs_every_stage_against_a_loopback_s3_server(tiny_gpt2, corpus_jsonl, tmp_path, capsys):
    """`make s3-demo`'s driver on a tiny model: the store goes into a bucket of the server it starts,
    training reads it through the local cache, eval reads its held-out chunks from the bucket."""
    cfg = compose_app("demo", [f"out={tmp_path / 'demo'}"], "s3")
    _, runs, _ = plan(cfg)
    assert all(r.data.cache_dir for r in runs.values()) and set(runs) == {"topk_1024", "switch4_1024"}
    cfg.harvest = [f"model={tiny_gpt2}", "layer=2", f"dataset.name={corpus_jsonl}", f"store={tmp_path / 'local'}",
                   "context_size=16", "chunk_seqs=2", "tokens=240", "batch_size=4", "progress=false", "device=cpu"]
    cfg.train = ["budget=steps:10", "batch_size=32", "data.eval_frac=0.25", "progress=false", "device=cpu",
                 "model.width=64", "model.k=4", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg.eval = ["ce_seqs=2", "progress=false", "device=cpu"]
    report = run_s3_demo(cfg)
    printed = capsys.readouterr().out
    assert "a loopback S3 server at http://127.0.0.1:" in printed and "the store: s3://switch-sae-demo/local" in printed
    for name in runs:
        run = tmp_path / "demo" / "runs" / name
        assert json.loads((run / "store.json").read_text())["path"] == "s3://switch-sae-demo/local"
        assert json.loads((run / "eval.json").read_text())["ce_sae"] is not None
    assert "| topk_1024 |" in report.read_text()
    assert list((tmp_path / "cache").rglob("acts/c/*/0"))
    assert not (tmp_path / "local").exists()  # nothing on local disk


def test_bad_demo_override_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nope=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("demo: error:") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(['runs.topk_512=["model=topk","model.k=99999"]'])
    err = capsys.readouterr().err
    assert err.startswith("demo: error:") and "k=99999" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["--config-name=nope"])
    err = capsys.readouterr().err
    assert err.startswith("demo: error:") and "nope" in err and err.count("\n") == 1
