"""Transcoders (data.target; harvest/paired.py, train.saes.base.SAE's transcoder options): a known linear
map recovered from synthetic paired stores, every architecture that transcodes trained as one with its FLOP
formula checked against FlopCounterMode, exact resume, CE loss recovered by patching the MLP of a real LM,
and bad input in one line before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harvest.held_out import HeldOut
from harvest.paired import PairedStore
from harvest.store import ActivationStore, Layout, StoreWriter
from tests.train.test_flops import counted
from tests.train.test_loop import assert_same_weights, make_cfg, train_killed_at
from train.config import TrainError
from train.loop import train
from train.saes import REGISTRY, build, load
from train.saes.flops import sae_cost

D, ATOMS = 16, 48
TRANSCODING = [arch for arch, cls in REGISTRY.items() if cls.transcodes]


def paired_stores(root: Path, n_chunks: int = 20, seed: int = 0, target_chunks: int | None = None
                  ) -> np.ndarray:
    """mlp_in and mlp_out stores of one made-up harvest: x = 5 (sparse codes, 3 of 48 atoms with weights in
    [0.5, 2]) @ D, y = A x for a random linear map A [16, 16]. Returns A."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    a = rng.normal(size=(D, D)) / np.sqrt(D)
    writers = []
    for site, chunks in (("mlp_in", n_chunks), ("mlp_out", target_chunks or n_chunks)):
        layout = Layout(d_model=D, context_size=17, first_pos=1, chunk_seqs=8, n_chunks=chunks, acts_dtype="float16")
        writers.append(StoreWriter.create(root / site, layout, [], {"model": "made-up", "layer": 0, "site": site,
                                                                    "config": {}}))
    tokens = np.zeros((8, 17), dtype=np.int32)
    for i in range(n_chunks):
        codes = np.zeros((8 * 16, ATOMS))
        for r in range(len(codes)):
            codes[r, rng.choice(ATOMS, 3, replace=False)] = rng.uniform(0.5, 2, 3)
        x = 5 * codes @ atoms
        writers[0].write_chunk(i, x.astype(np.float16), tokens, {})
        if i < (target_chunks or n_chunks):
            writers[1].write_chunk(i, (x @ a.T).astype(np.float16), tokens, {})
    return a


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoder")
    return root, paired_stores(root)


def held_out_fve(root: Path, sae_dir: Path) -> float:
    sae = load(sae_dir)
    rows = torch.cat(list(HeldOut.of(PairedStore(ActivationStore(root / "mlp_in"), ActivationStore(root / "mlp_out")),
                                     0.1, None).rows()))
    x, y = sae.split(rows)
    with torch.no_grad():
        resid = y - sae(x, y).recon
    return 1 - (resid.var(0).sum() / y.var(0).sum()).item()


def transcoder_cfg(root: Path, *overrides: str):
    return make_cfg(root / "mlp_in", f"data.target={root / 'mlp_out'}", *overrides)


# Measured here: W_skip ends 11% from A (relative Frobenius norm); the dictionary carries the rest of the map,
# whose directions A D_i lie in W_skip's range too.
def test_a_skip_transcoder_recovers_the_known_linear_map(stores, tmp_path):
    root, a = stores
    run = train(transcoder_cfg(root, "model=topk", "model.width=64", "model.k=3", "model.skip=true",
                               "budget=steps:600"), tmp_path / "run")
    sae = load(run)
    assert sae.transcoder and sae.skip and sae.d_rows == 2 * D
    error = torch.linalg.norm(sae.W_skip.detach() - torch.from_numpy(a).float()) / np.linalg.norm(a)
    assert error < 0.2 and held_out_fve(root, run) > 0.99


# Measured here at 600 steps (held-out FVE of y = A x, no skip connection): topk 0.86, batchtopk 0.87,
# matryoshka 0.86, switch (alpha 0.1) 0.81; the dictionary must learn the directions A D_i themselves.
@pytest.mark.parametrize("arch", TRANSCODING)
def test_every_transcoding_architecture_learns_the_map_without_a_skip(stores, tmp_path, arch):
    root, _ = stores
    extra = ["model.n_experts=4", "model.alpha=0.1"] if REGISTRY[arch].has_experts else []
    run = train(transcoder_cfg(root, f"model={arch}", "model.width=64", "model.k=3", *extra, "budget=steps:600"),
                tmp_path / "run")
    assert held_out_fve(root, run) > 0.7


@pytest.mark.parametrize("arch", TRANSCODING)
@pytest.mark.parametrize("skip", [False, True])
def test_flop_formulas_count_what_a_transcoder_runs(arch, skip):
    sizes = dict(n_experts=4, expert_width=16, k=4) if REGISTRY[arch].has_experts else dict(width=64, k=4)
    torch.manual_seed(0)
    sae = build(arch, d=D, transcoder=True, skip=skip, **sizes)
    x, y = torch.randn(32, D), torch.randn(32, D)
    c = sae_cost(sae)
    assert c.params == sum(p.numel() for p in sae.parameters())
    with torch.no_grad():
        assert counted(lambda: sae.reconstruct(x)) == 32 * c.forward
    assert counted(lambda: sae(x, y).losses["loss"].backward()) == 32 * c.train
    plain = sae_cost(build(arch, d=D, **sizes))
    assert c.train - plain.train == (4 * D * D if skip else 0) and c.params - plain.params == D + (D * D if skip else 0)


def test_a_killed_transcoder_run_resumes_to_the_same_weights(stores, tmp_path, monkeypatch):
    root, _ = stores
    cfg = transcoder_cfg(root, "model=switch", "model.width=64", "model.n_experts=4", "model.k=4", "model.skip=true",
                         "budget=steps:60", "checkpoint_every=20")
    train(cfg, tmp_path / "straight")
    train_killed_at(cfg, tmp_path / "killed", 50, monkeypatch)
    train(cfg, tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")


def test_bad_transcoder_settings_fail_in_one_line_before_any_work(stores, tmp_path):
    root, _ = stores
    paired_stores(tmp_path, n_chunks=20, target_chunks=10)  # a target that stops half way
    with pytest.raises(TrainError, match=r"data.target makes a transcoder, which model=relu cannot be") as e:
        make_cfg(root / "mlp_in", f"data.target={root / 'mlp_out'}", "model=relu")
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="model.skip=true is a transcoder's skip connection"):
        make_cfg(root / "mlp_in", "model.skip=true")
    with pytest.raises(TrainError, match="expert_parallel trains autoencoders only"):
        make_cfg(root / "mlp_in", f"data.target={root / 'mlp_out'}", "model=switch", "model.width=64",
                 "model.n_experts=4", "model.k=4", "expert_parallel=2")
    # stores that do not pair: refused when training opens them, before anything is written
    for target, message in ((tmp_path / "mlp_out", "differ in length: rows 2,560 vs 1,280"),
                            (root / "mlp_in", "are one store")):
        cfg = make_cfg(root / "mlp_in", f"data.target={target}", "model.width=64", "model.k=3")
        with pytest.raises(TrainError, match=message) as e:
            train(cfg, tmp_path / "never")
        assert "\n" not in str(e.value) and not (tmp_path / "never" / "sae").exists()


def test_a_transcoder_of_a_real_lm_end_to_end(tiny_gpt2, corpus_jsonl, tmp_path):
    """mlp_in and mlp_out of the tiny GPT-2 harvested in one pass -> a Switch transcoder -> eval (CE loss
    recovered with the MLP's output patched), a dashboard, and the export's refusal, each through its entry."""
    from eval.dashboard import DashboardConfig, build_dashboard
    from eval.run import evaluate
    from harvest.run import harvest
    from interop.export import ExportConfig, ExportError, export
    from runtime.config import compose_app
    from tests.conftest import compose, eval_config, harvest_overrides

    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, "x", layer=2, site="[mlp_in,mlp_out]", tokens=600)
                    + [f"store='{tmp_path}/{{site}}'"]))
    cfg = make_cfg(tmp_path / "mlp_in", f"data.target={tmp_path / 'mlp_out'}", "model=switch", "model.width=64",
                   "model.n_experts=4", "model.k=4", "model.skip=true", "budget=steps:40", "batch_size=32")
    train(cfg, tmp_path / "run")
    [result] = evaluate(eval_config(tmp_path / "run", ce=True))
    assert result.loss_recovered is not None and result.ce_sae is not None and result.fve is not None
    assert result.ce_zero != result.ce_clean  # the zero pass ablated the MLP's output
    index = build_dashboard(DashboardConfig.from_omegaconf(compose_app(
        "eval", [f"run={tmp_path / 'run'}", "n_features=2", "device=cpu", "progress=false"], name="dashboard")))
    assert index.is_file()
    with pytest.raises(ExportError, match="is a transcoder, which has no SAELens counterpart"):
        export(ExportConfig(run=str(tmp_path / "run"), format="saelens", out=str(tmp_path / "lens"), hook_name=None,
                            plugin=True, overwrite=False))
