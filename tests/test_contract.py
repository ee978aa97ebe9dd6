"""The architecture contract (train/saes/base.py), checked for every registered architecture.

One parametrised test walks an architecture through every stage on a tiny harvested store, reading
nothing but what the class declares: built from its YAML, trained, killed and resumed to the same
weights, its FLOP formulas against torch's FlopCounterMode (forward and training step, the kernels
it runs), its layout and feature directions, eval, geometry, a dashboard, and export to SAELens and
import back (or the export's stated refusal). An architecture registered without one of these pieces
fails here, not in a user's hands.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from harvest.run import harvest
from harvest.store import ActivationStore
from runtime.config import compose_app
from tests.conftest import compose, eval_config, harvest_overrides
from tests.train.test_flops import counted
from tests.train.test_loop import assert_same_weights, make_cfg, train_killed_at
from train.run_dir import RunDir
from train.saes import REGISTRY, build
from train.saes.base import Layout, model_yaml
from train.saes.flops import sae_cost

# model keys shrunk for a store of d=32, wherever an architecture's YAML has them; every other key stays
# at the YAML's value
SMALL = {"width": 64, "k": 4, "n_experts": 4, "aux_k": 16}
STEPS, CHECKPOINT, KILL = 20, 10, 15


@pytest.fixture(scope="module")
def store(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    """20 chunks of the tiny GPT-2 (d=32), with its tokenizer and token ids (what dashboards read)."""
    path = tmp_path_factory.mktemp("contract") / "store"
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, path, tokens=600, **{"dataset.packing": "document"})))
    return path


def model_overrides(arch: str) -> list[str]:
    yaml = model_yaml(arch)
    return [f"model={arch}", *(f"model.{key}={value}" for key, value in SMALL.items() if key in yaml)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", list(REGISTRY))
def test_every_architecture_keeps_the_whole_contract(arch, store, tmp_path, monkeypatch):
    cls = REGISTRY[arch]
    d = ActivationStore(store).d_model
    cfg = make_cfg(store, *model_overrides(arch), f"budget=steps:{STEPS}", f"checkpoint_every={CHECKPOINT}",
                   "batch_size=32", "log_every=5", "lr=0.001")

    # built from its YAML: the trainer's SAE is the one the YAML's keys give, and Python with the sizes alone
    # builds the same architecture
    from train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical resume
    try:
        train(cfg, tmp_path / "run")
        train_killed_at(cfg, tmp_path / "resumed", KILL, monkeypatch)
        train(cfg, tmp_path / "resumed")
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(tmp_path / "run" / "sae", tmp_path / "resumed" / "sae")
    run = RunDir(tmp_path / "run")
    sae = run.load_sae("cpu")
    assert sae.arch == arch and sae.config() == build(arch, **cfg.sae_kwargs(d)).config()
    assert run.read_log(run.METRICS)[-1]["step"] == STEPS

    # layout and directions: what metrics, geometry and dashboards read
    layout = sae.layout()
    assert isinstance(layout, Layout) and layout == cls.layout_of(sae.config())
    assert layout.d == d and layout.n_latents == cfg.sae_kwargs(d).get("width", layout.n_latents)
    assert sae.decoder_directions().shape == sae.encoder_directions().shape == (layout.n_latents, d)
    assert layout.routed <= layout.n_latents and (layout.n_experts > 0) == cls.has_experts
    x = torch.from_numpy(ActivationStore(store).read_chunk(0)).float()[:64]
    with torch.no_grad():
        codes = sae.encode(x)
    rows, latents, _ = codes.nonzero()
    assert bool((latents < layout.n_latents).all())
    if layout.n_experts:  # every routed latent a token uses belongs to an expert of that token's router
        routed = latents < layout.routed
        owner = latents[routed] // layout.expert_width
        assert bool((codes.probs[rows[routed], owner] > 0).all())

    # FLOPs: the formulas count exactly what the module runs, forward and one training step
    cost = sae_cost(sae)
    sae.train()  # the encoding rule training runs (BatchTopK's inference rule decodes its codes densely)
    with torch.no_grad():
        assert counted(lambda: sae.decode(sae.encode(x))) == cost.forward * len(x)
    assert counted(lambda: sae(x).losses["loss"].backward()) == cost.train * len(x)
    assert cost.params == sum(p.numel() for p in sae.parameters())
    sae.eval()

    # eval, geometry, dashboard: each through its own entry, reading the SAE only through the contract
    from eval.dashboard import DashboardConfig, build_dashboard
    from eval.geometry import GeometryConfig, geometry
    from eval.run import evaluate

    result = evaluate(eval_config(run.path, ce=False))[0]
    assert (result["arch"], result["n_latents"], result["k"], result["n_experts"]) == \
        (arch, layout.n_latents, layout.k, layout.n_experts or None)
    geo = geometry(GeometryConfig.from_omegaconf(compose_app("eval", [f"run={run.path}", "tsne=false", "device=cpu"],
                                                                     name="geometry")))[0][0]
    assert geo["n_latents"] == (layout.routed or layout.n_latents) and geo["n_experts"] == (layout.n_experts or None)
    if layout.n_experts:  # every routed run: the redundancy block, co-firing measured on its held-out tokens
        red = geo["redundancy"]
        assert -1 <= red["overlap_random"] <= 1 and red["cofire_tokens"] > 0 and red["firings"] > 0
    else:
        assert geo["redundancy"] is None
    index = build_dashboard(DashboardConfig.from_omegaconf(compose_app(
        "eval", [f"run={run.path}", "n_features=3", "device=cpu", "progress=false"], name="dashboard")))
    pages = list(index.parent.glob("feature_*.html"))  # features that fired on the held-out rows, at most 3
    linked = set(re.findall(r'href="(feature_\d+\.html)"', index.read_text()))
    assert linked == {p.name for p in pages} and len(pages) <= 3
    assert all(0 <= int(p.stem.split("_")[1]) < layout.n_latents for p in pages)

    # SAELens: export and import back to the same SAE, or the stated refusal
    from interop.export import ExportConfig, ExportError, export
    from interop.import_saelens import ImportConfig, import_saelens

    export_cfg = ExportConfig(run=str(run.path), format="saelens", out=str(tmp_path / "lens"), hook_name=None,
                              plugin=True, overwrite=False)
    if cls.saelens_architecture is None:
        assert cls.saelens_refusal, f"{arch} states neither a SAELens counterpart nor why it has none"
        with pytest.raises(ExportError, match="has no SAELens counterpart"):
            export(export_cfg)
        return
    folder = export(export_cfg).out
    sae = run.load_sae("cpu")  # as saved: the training-mode forward above moved BatchTopK's threshold
    import interop.saelens_switch  # noqa: F401  (registers "switch" with SAELens)
    from sae_lens import SAE as LensSAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lens = LensSAE.load_from_disk(str(folder))
    with torch.no_grad():
        assert torch.allclose(lens.decode(lens.encode(x)), sae(x).recon, atol=1e-4)
    back = import_saelens(ImportConfig(sae=str(folder), store=str(store), out=str(tmp_path / "back"),
                                       eval_frac=0.1, outlier_factor=None, match_model=True, overwrite=False))
    assert back.sae.arch == arch
    with torch.no_grad():
        assert torch.allclose(back.sae(x).recon, sae(x).recon, atol=1e-4)


def test_every_architecture_declares_its_saelens_side():
    """Stated by the class itself, not inherited: a counterpart with both maps, or a reason for none."""
    for arch, cls in REGISTRY.items():
        assert "saelens_architecture" in vars(cls), f"{arch} does not state its SAELens counterpart"
        if cls.saelens_architecture is None:
            assert cls.saelens_refusal, arch
        else:
            assert "to_saelens" in vars(cls), f"{arch} names SAELens {cls.saelens_architecture} but has no to_saelens"
            takers = [c for c in REGISTRY.values() if cls.saelens_architecture in c.saelens_imports]
            assert takers, f"nothing imports SAELens {cls.saelens_architecture}"
